"""Pictures of a model: sample grids, latent traversals, and the sample job's PNG files."""

from __future__ import annotations

import numpy as np
import torch

from ray_galaxy.generation.generator import Generator
from ray_galaxy.generation.latents import most_active_dims, traversal_latents
from ray_galaxy.images import grid, png_bytes
from ray_galaxy.storage import join, write_bytes

TRAVERSAL_STEPS = 8
PRIOR_SPAN = 3.0     # the prior's traversal: -3..3 in each of the two dims
SAMPLER_SPAN_SD = 2.5  # with a sampler: its mean code +- 2.5 sd of the training codes


def sample_grid(gen: Generator, n: int = 64, seed: int = 0, sampler: str = "auto") -> np.ndarray:
    """A mosaic of ``n`` galaxies from ``seed`` (the fitted sampler's when there is one)."""
    return grid(gen.images(n, seed, sampler))


def traversal_figure(gen: Generator, kl_per_dim: list[float] | None = None,
                     steps: int = TRAVERSAL_STEPS) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Two latent dims swept over rows and columns, the others fixed; (mosaic, dims).

    With a sampler: around its mean code, each dim over +-2.5 standard deviations of the
    training codes (with a small KL weight the codes fill a region far narrower than N(0, I),
    and the prior's -3..3 sweep would decode mostly broken frames). Without one: the original
    figure, the others at 0 and each dim over -3..3, on the dims with the most KL
    (``kl_per_dim``, default the recorded validation KL).
    """
    d = gen.model_config.latent_dim
    if d < 2:
        return None
    if gen.sampler is not None:
        sd = np.sqrt(gen.sampler.variance())
        dims = most_active_dims(sd, 2)
        z = traversal_latents(gen.sampler.mean_code(), dims, steps,
                              (SAMPLER_SPAN_SD * float(sd[dims[0]]), SAMPLER_SPAN_SD * float(sd[dims[1]])),
                              around_base=True)
    else:
        kl = kl_per_dim if kl_per_dim is not None else (gen.model_dir.metrics.get("best") or {}).get("val_kl_per_dim")
        dims = most_active_dims(kl, 2) if kl is not None and len(kl) == d else (0, 1)
        z = traversal_latents(torch.zeros(d), dims, steps, PRIOR_SPAN)
    return grid(gen.decode_uint8(z), ncols=steps), (int(dims[0]), int(dims[1]))


def write_samples(gen: Generator, out: str, n: int, seed: int = 0, temperature: float = 1.0,
                  with_grid: bool = False, batch: int = 256, sampler: str = "auto",
                  detail: bool = True, label: str | None = None, where: str | None = None) -> list[str]:
    """Write ``n`` galaxies (of class ``label``, from training galaxies satisfying ``where``, when
    given) to ``out/sample_00000.png`` ... (a local folder or a URI).

    Image i is galaxy i of ``seed`` (:meth:`Generator.latents`): the same whatever ``n`` is.
    """
    gen.check_label(label, sampler)  # before any file is written
    gen.check_where(where, sampler, label)
    written, shown = [], []
    for start in range(0, n, batch):
        k = min(batch, n - start)
        imgs = gen.images(k, seed, sampler, temperature, detail, start=start, label=label, where=where)
        for j, img in enumerate(imgs):
            path = join(out, f"sample_{start + j:05d}.png")
            write_bytes(path, png_bytes(img))
            written.append(path)
        if with_grid and start < 4096:
            shown.append(imgs)
    if with_grid:
        path = join(out, "grid.png")
        write_bytes(path, png_bytes(grid(np.concatenate(shown)[:4096])))
        written.append(path)
    return written
