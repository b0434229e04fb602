"""Latent codes: the N(0, I) prior, spherical interpolation and traversal grids.

Everything here depends only on the latent size (no weights), so the HTTP ingress, the
decoder replicas and the batch jobs draw exactly the same codes for the same seed.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

# A seed's galaxies are drawn in blocks of this many codes: galaxy i of seed s is row
# i % SEED_BLOCK of the block drawn from seed s + i // SEED_BLOCK. So galaxy i is the same
# whatever n a caller asks for (torch's and the mixture's draws for a seed depend on how many
# are drawn), and Serve's first n galaxies of a seed are the first n that jobs/sample.py writes.
SEED_BLOCK = 256


def seeded_rows(draw_block: Callable[[int], torch.Tensor], n: int, seed: int, start: int = 0) -> torch.Tensor:
    """Galaxies ``start`` .. ``start + n - 1`` of ``seed``: rows of ``draw_block(seed + b)`` (each
    a (SEED_BLOCK, D) tensor) for the blocks b they fall in."""
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    first, last = start // SEED_BLOCK, (start + n - 1) // SEED_BLOCK
    z = torch.cat([draw_block(seed + b) for b in range(first, last + 1)])
    offset = start - first * SEED_BLOCK
    return z[offset:offset + n]


def prior_latents(latent_dim: int, n: int, seed: int = 0, temperature: float = 1.0, start: int = 0) -> torch.Tensor:
    """(n, latent_dim) codes of galaxies ``start``.. of ``seed`` from N(0, temperature^2 I),
    drawn on the CPU (so they do not depend on the device)."""
    def block(s: int) -> torch.Tensor:
        return torch.randn(SEED_BLOCK, latent_dim, generator=torch.Generator().manual_seed(int(s)))

    return seeded_rows(block, n, seed, start) * float(temperature)


def slerp(z0: np.ndarray | torch.Tensor, z1: np.ndarray | torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` codes from z0 to z1 (both included) by spherical interpolation, (steps, D).

    Slerp of unnormalised vectors (Shoemake 1985; White 2016, "Sampling Generative Networks"):
    the path follows the great circle between the directions and its norm moves steadily
    between the endpoints' norms, so it keeps a plausible radius where a straight line would
    pass near the origin. When the
    angle is ~0 or ~pi (sin(omega) ~ 0: the great circle is undefined for opposite codes) or a
    vector is 0, it falls back to the straight line.
    """
    a = torch.as_tensor(np.asarray(z0, np.float64))
    b = torch.as_tensor(np.asarray(z1, np.float64))
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)[:, None]
    na, nb = float(a.norm()), float(b.norm())
    if na > 0 and nb > 0:
        omega = math.acos(max(-1.0, min(1.0, float(a @ b) / (na * nb))))
        so = math.sin(omega)
        if so > 1e-6:
            return (torch.sin((1 - t) * omega) / so * a + torch.sin(t * omega) / so * b).float()
    return ((1 - t) * a + t * b).float()


def traversal_latents(base: torch.Tensor, dims: tuple[int, int], steps: int = 8,
                      span: float | tuple[float, float] = 3.0, around_base: bool = False) -> torch.Tensor:
    """(steps * steps, D) codes equal to ``base`` except in two dims: dims[0] sweeps down the rows,
    dims[1] across the columns, each over -span..span (per dim when ``span`` is a pair), taken
    as absolute values or, with ``around_base``, as offsets from the base code."""
    d = base.shape[-1]
    if len(dims) != 2 or any(not 0 <= i < d for i in dims) or dims[0] == dims[1]:
        raise ValueError(f"dims must be two different latent indices in 0..{d - 1}, got {dims}")
    spans = span if isinstance(span, tuple) else (span, span)
    base = base.float()
    v0, v1 = (torch.linspace(-float(s), float(s), steps) + (base[i] if around_base else 0)
              for s, i in zip(spans, dims))
    z = base.repeat(steps * steps, 1)
    z[:, dims[0]] = v0.repeat_interleave(steps)
    z[:, dims[1]] = v1.repeat(steps)
    return z


def most_active_dims(score: list[float] | np.ndarray, k: int = 2) -> tuple[int, ...]:
    """Indices of the ``k`` latent dims with the highest score (KL or variance), ties by index."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    return tuple(int(i) for i in order[:k])
