"""Synthetic galaxies and broken files for tests (no network, no shared data needed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def galaxy(size: int, rng: np.random.Generator, ellipticity: float | None = None,
           angle: float | None = None, sigma: float | None = None, noise: float = 4.0) -> np.ndarray:
    """A smooth elliptical blob with a colour gradient on a dark noisy sky: (size, size, 3) uint8."""
    e = rng.uniform(0, 0.6) if ellipticity is None else ellipticity
    th = rng.uniform(0, np.pi) if angle is None else angle
    s = rng.uniform(0.08, 0.18) * size if sigma is None else sigma
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    u = x * np.cos(th) + y * np.sin(th)
    v = -x * np.sin(th) + y * np.cos(th)
    r2 = u ** 2 + (v / (1 - e)) ** 2
    core = np.exp(-r2 / (2 * s ** 2))
    halo = np.exp(-np.sqrt(r2) / (1.5 * s))
    colour = rng.uniform(0.6, 1.0, size=3)
    img = 200 * (0.6 * core[..., None] * colour + 0.4 * halo[..., None] * colour[::-1])
    img += rng.normal(10, noise, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(root: Path, n: int, size: int = 48, seed: int = 0, fmt: str = "png") -> list[Path]:
    """Write ``n`` synthetic galaxies into ``root`` (some in a subfolder, to test recursion)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = root / ("nested" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"gal_{i:04d}.{fmt}"
        Image.fromarray(galaxy(size, rng)).save(p)
        paths.append(p)
    return paths


def jpeg_bytes(img: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_corrupt(root: Path) -> dict[str, Path]:
    """The classic broken files: empty, truncated JPEG, text named .jpg."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(123)
    good = jpeg_bytes(galaxy(64, rng))
    files = {
        "empty": root / "empty.jpg",
        "truncated": root / "truncated.jpg",
        "text": root / "notes.jpg",
    }
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good[: len(good) // 3])
    files["text"].write_text("this is not an image\n")
    return files


def clumpy_galaxy(size: int, rng: np.random.Generator) -> np.ndarray:
    """A galaxy with star-forming clumps: structure, so perceptual hashes tell galaxies apart.

    (Perfectly smooth blobs make poor hashing tests: their higher DCT coefficients are noise.)
    """
    img = galaxy(size, rng, ellipticity=rng.uniform(0, 0.7), angle=rng.uniform(0, 3.1),
                 sigma=rng.uniform(0.06, 0.16) * size).astype(np.float64)
    y, x = np.mgrid[:size, :size]
    for _ in range(6):
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        s = rng.uniform(0.02, 0.05) * size
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))
        img += 120 * blob[..., None] * rng.uniform(0.5, 1.0, 3)
    return np.clip(img, 0, 255).astype(np.uint8)
