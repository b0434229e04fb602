"""Distances between the distributions of per-image statistics (real vs generated).

One home for the normalised 1-D Wasserstein table and its one-number summary, used by the
evaluation report (morphology, sharpness, per-class), the ranking of Tune trials and the tests.
The statistics themselves are measured in :mod:`ray_galaxy.morphology` and
:mod:`ray_galaxy.evaluation.sharpness`.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from scipy.stats import wasserstein_distance


def mean_distance(distances: Iterable[float]) -> float:
    """Mean of the finite distances (a statistic that failed on every image is NaN), NaN when
    none is finite: the one summary every report and ranking uses."""
    v = np.asarray(list(distances), dtype=np.float64)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else math.nan


def wasserstein_table(real: dict[str, np.ndarray], generated: dict[str, np.ndarray],
                      seed: int = 0, splits: int = 5) -> dict[str, dict[str, float]]:
    """Per statistic: 1-D Wasserstein distance real vs generated / std(real), and the floor.

    The floor is the same normalised distance between two random halves of the real set,
    averaged over ``splits`` splits: what sampling noise alone gives. (Halves have half the
    images, so the floor slightly overstates the noise of a full-size comparison.)
    NaNs (failed measurements) are dropped.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for k in real:
        r = real[k][np.isfinite(real[k])]
        g = generated[k][np.isfinite(generated[k])]
        sd = float(np.std(r)) if len(r) > 1 else math.nan
        if len(r) < 2 or len(g) < 1 or not sd > 0:
            out[k] = {"distance": math.nan, "floor": math.nan, "real_std": sd}
            continue
        floors = []
        for _ in range(splits):
            p = rng.permutation(len(r))
            floors.append(wasserstein_distance(r[p[: len(r) // 2]], r[p[len(r) // 2:]]) / sd)
        out[k] = {"distance": float(wasserstein_distance(r, g) / sd), "floor": float(np.mean(floors)),
                  "real_std": sd}
    return out
