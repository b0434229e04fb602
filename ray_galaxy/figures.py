"""Pictures of a model: sample grids, latent traversals, PNG encoding (Pillow + numpy only)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from ray_galaxy.model import ConvVAE, to_uint8


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (deterministic for the same pixels)."""
    from PIL import Image

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


def sample_grid(model: ConvVAE, n: int = 64, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
    """A grid of ``n`` prior samples from ``seed``."""
    return grid(to_uint8(model.sample(n, seed=seed, temperature=temperature)).numpy())


def traversal_latents(latent_dim: int, dims: tuple[int, int], steps: int = 8, span: float = 3.0,
                      base: torch.Tensor | None = None) -> torch.Tensor:
    """(steps*steps, latent_dim) codes: dims[0] varies down rows, dims[1] across columns."""
    if len(dims) != 2 or any(not 0 <= d < latent_dim for d in dims) or dims[0] == dims[1]:
        raise ValueError(f"dims must be two different latent indices in 0..{latent_dim - 1}, got {dims}")
    vals = torch.linspace(-span, span, steps)
    z = (base.clone() if base is not None else torch.zeros(latent_dim)).repeat(steps * steps, 1)
    z[:, dims[0]] = vals.repeat_interleave(steps)
    z[:, dims[1]] = vals.repeat(steps)
    return z


def traversal(model: ConvVAE, dims: tuple[int, int], steps: int = 8, span: float = 3.0) -> np.ndarray:
    """The original figure: two latent dims swept over rows and columns, the others at 0."""
    z = traversal_latents(model.config.latent_dim, dims, steps, span)
    return grid(to_uint8(model.decode(z)).numpy(), ncols=steps)


def sampler_traversal(model: ConvVAE, gmm: dict, steps: int = 8, nsd: float = 2.5
                      ) -> tuple[np.ndarray, tuple[int, int]]:
    """The traversal figure for a model with a fitted sampler: around the mixture's mean code,
    the two dims that vary most over the training codes, each swept over +-``nsd`` of its
    standard deviation. (With a small KL weight the codes fill a region far narrower than
    N(0, I): the prior's -3..3 sweep would decode mostly empty or broken frames.)"""
    from ray_galaxy.evaluate import gmm_variance

    sd = np.sqrt(gmm_variance(gmm))
    w = gmm["weights"].double()
    mean = (w[:, None] * gmm["means"].double()).sum(0).float()
    d0, d1 = (int(i) for i in np.argsort(-sd, kind="stable")[:2])
    t = torch.linspace(-nsd, nsd, steps)
    z = mean.repeat(steps * steps, 1)
    z[:, d0] = (mean[d0] + float(sd[d0]) * t).repeat_interleave(steps)
    z[:, d1] = (mean[d1] + float(sd[d1]) * t).repeat(steps)
    return grid(to_uint8(model.decode(z)).numpy(), ncols=steps), (d0, d1)


def most_active_dims(kl_per_dim: list[float] | np.ndarray, k: int = 2) -> tuple[int, ...]:
    """Indices of the ``k`` latent dims carrying the most KL (the ones the model uses)."""
    order = np.argsort(-np.asarray(kl_per_dim, dtype=np.float64), kind="stable")
    return tuple(int(i) for i in order[:k])


def pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Originals over reconstructions: two rows of (N, S, S, 3) -> a 2-row grid."""
    return grid(np.concatenate([a, b]), ncols=len(a))


def write_samples(model_uri: str, out: str, n: int, seed: int = 0, temperature: float = 1.0,
                  with_grid: bool = False, batch: int = 256, sampler: str = "auto",
                  detail: bool = True) -> list[str]:
    """Write ``n`` generated galaxies of a model directory to ``out/sample_00000.png`` ...

    ``sampler`` 'prior', 'gmm' (with the sampler's residual detail unless ``detail`` is false) or
    'auto' (gmm when the directory has a sampler).

    Image i is the same whatever ``n`` is: each batch draws from ``seed + batch index``.
    """
    from pathlib import Path

    from ray_galaxy.checkpoint import load_model_dir
    from ray_galaxy.evaluate import generate

    md = load_model_dir(model_uri)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    written, all_images = [], []
    for start in range(0, n, batch):
        k = min(batch, n - start)
        imgs = to_uint8(generate(md, batch, seed + start // batch, sampler, temperature, detail, keep=k)).numpy()
        for j, img in enumerate(imgs):
            path = outdir / f"sample_{start + j:05d}.png"
            path.write_bytes(png_bytes(img))
            written.append(str(path))
        if with_grid:
            all_images.append(imgs)
    if with_grid:
        path = outdir / "grid.png"
        path.write_bytes(png_bytes(grid(np.concatenate(all_images)[:4096])))
        written.append(str(path))
    return written
