"""Image helpers shared by data, generation and evaluation (numpy, torch and Pillow only).

* the dihedral group D4 (galaxies have no preferred orientation): :func:`orient` for (N, S, S, 3)
  arrays, :func:`augment_d4` for (B, C, S, S) tensors, both with the same element order;
* PNG encoding and image mosaics;
* the sky frame, luminance and radially averaged power spectra that the residual detail model
  and the evaluation both measure.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

# Element o of D4: rotation by r * 90 degrees, then a mirror flip when f.
D4: list[tuple[int, bool]] = [(r, f) for f in (False, True) for r in range(4)]


def orient(images: np.ndarray, o: int) -> np.ndarray:
    """Element ``o`` (0..7) of D4 applied to (N, S, S, C) images."""
    r, f = D4[o]
    y = np.rot90(images, r, axes=(1, 2))
    return np.ascontiguousarray(y[:, :, ::-1] if f else y)


def orient_tensor(x: torch.Tensor, o: int) -> torch.Tensor:
    """Element ``o`` (0..7) of D4 applied to (B, C, S, S) tensors; the same map as :func:`orient`."""
    r, f = D4[o]
    y = torch.rot90(x, r, dims=(2, 3))
    return torch.flip(y, dims=(3,)) if f else y


def augment_d4(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """An independent random element of D4 for each image of ``x`` (B, C, S, S)."""
    g = torch.randint(0, len(D4), (x.shape[0],), generator=generator).to(x.device)
    out = torch.empty_like(x)
    for o in range(len(D4)):
        idx = (g == o).nonzero(as_tuple=True)[0]
        if idx.numel():
            out[idx] = orient_tensor(x[idx], o)
    return out


# --------------------------------------------------------------------------- pictures


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (deterministic for the same pixels)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, S, S, 3) uint8 -> one (rows*(S+pad)+pad, cols*(S+pad)+pad, 3) uint8 mosaic."""
    n, s = images.shape[0], images.shape[1]
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (s + pad) + pad, ncols * (s + pad) + pad, 3), 40, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (s + pad), pad + c * (s + pad)
        out[y:y + s, x:x + s] = images[i]
    return out


def pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Originals over reconstructions: two rows of (N, S, S, 3) -> a 2-row grid."""
    return grid(np.concatenate([a, b]), ncols=len(a))


# --------------------------------------------------------------------------- sky and spectra


def as_float_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 or floats in [0, 1] -> float64 in [0, 1] (any shape)."""
    a = np.asarray(image)
    return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)


def luminance(image: np.ndarray) -> np.ndarray:
    """(..., S, S, 3) -> (..., S, S): the unweighted mean of the three channels, in [0, 1]."""
    return as_float_rgb(image).mean(-1)


def frame_mask(size: int, width: int | None = None) -> np.ndarray:
    """(size, size) bool: the outer frame where the sky is measured (default width S/8, >= 2)."""
    w = width or max(2, size // 8)
    m = np.ones((size, size), bool)
    m[w:-w, w:-w] = False
    return m


def border(a: np.ndarray, width: int | None = None) -> np.ndarray:
    """The pixels of the outer frame of a 2-D array."""
    return a[frame_mask(a.shape[0], width)]


def sky_level(images: np.ndarray) -> np.ndarray:
    """Per image and band sky: median of the frame. (N, S, S, 3) -> (N, 1, 1, 3)."""
    m = frame_mask(images.shape[1])
    return np.median(images[:, m, :], axis=1)[:, None, None, :]


def ring_index(size: int, half: bool = False) -> np.ndarray:
    """Integer |k| (cycles per image) of each FFT bin of a (size, size) image.

    ``half``: the bins of ``rfft2`` (size, size // 2 + 1) instead of ``fft2`` (size, size).
    """
    fy = np.fft.fftfreq(size) * size
    fx = (np.fft.rfftfreq(size) if half else np.fft.fftfreq(size)) * size
    return np.rint(np.hypot(fy[:, None], fx[None, :])).astype(np.int64)


def radial_power_spectrum(lum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k, P(k)) for k = 1..S/2 cycles per image: mean radially averaged power of (N, S, S) images.

    Each image has its sky (median of the frame) removed first, so the periodic FFT sees no
    edge step; power is |FFT|^2 / S^4 averaged over the annulus round(|k|) = k, then over images.
    """
    lum = np.asarray(lum, np.float64)
    if lum.ndim == 2:
        lum = lum[None]
    s = lum.shape[-1]
    sky = np.median(lum[:, frame_mask(s)], axis=1)
    p = np.abs(np.fft.fft2(lum - sky[:, None, None])) ** 2 / s ** 4
    kr = ring_index(s).ravel()
    k = np.arange(1, s // 2 + 1)
    sums = np.stack([np.bincount(kr, weights=pi.ravel(), minlength=s) for pi in p]).mean(0)
    counts = np.bincount(kr, minlength=s)
    return k.astype(np.float64), sums[k] / counts[k]


def structure_band(size: int) -> tuple[float, float]:
    """The structure band in cycles per image: 1/16 to 1/4 of the image size."""
    return size / 16, size / 4


def power_deficit_dex(k: np.ndarray, p_generated: np.ndarray, p_real: np.ndarray, size: int) -> float:
    """Mean of log10(P_gen / P_real) over the structure band (negative: generated lack power).

    Higher frequencies are excluded: there the real images' power is sensor noise and JPEG
    artefacts, which a model should not reproduce.
    """
    lo, hi = structure_band(size)
    band = (k >= lo) & (k <= hi)
    return float(np.mean(np.log10(p_generated[band] / p_real[band])))
