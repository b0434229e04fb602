"""Properties of the training galaxies, kept with the sampler's kernels (docs/properties.md).

When the sampler is fitted, every training image is measured once (:func:`measure_properties`,
with :mod:`ray_galaxy.morphology`, the statistics the evaluation uses) and the values are stored
in ``sampler.pt`` as ``image_properties`` (N images x P properties, float64), their names in
``sampler.json`` (``properties``). A kernel is one training image in one D4 orientation, and the
kernels are the images orientation by orientation, so kernel k holds image k mod N; every
property here is unchanged by the D4 rotations and flips, so one measurement serves all eight.

``--where`` (:mod:`ray_galaxy.generation.where`) then restricts draws to the kernels of the
training galaxies that satisfy it: :func:`selected_images`.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np

from ray_galaxy import morphology
from ray_galaxy.console import fmt_seconds, log
from ray_galaxy.generation.where import WhereError, where_mask

# User-facing name -> (the statistic in ray_galaxy.morphology, unit). docs/properties.md says
# how each is measured.
PROPERTIES: dict[str, tuple[str, str]] = {
    "r50_px": ("r_half", "px"),
    "flux": ("flux", "image units (pixel values in [0, 1] summed over pixels)"),
    "ellipticity": ("ellipticity", "1 - b/a"),
    "colour": ("colour", "mag, -2.5 log10(B/R)"),
    "concentration": ("concentration", "5 log10(r80/r20)"),
    "asymmetry": ("asymmetry", "fraction of the flux"),
    "smoothness": ("smoothness", "fraction of the flux"),
    "gini": ("gini", "0..1"),
    "m20": ("m20", "dex"),
}
PROPERTY_NAMES = tuple(PROPERTIES)
# Fewer matching training galaxies than this is an error, not a draw: the samples would be
# near-copies of a handful of galaxies (one galaxy is eight kernels, its D4 orientations).
MIN_MATCHES = 20
IQR_PER_SIGMA = 1.349  # the interquartile range of a normal distribution, in standard deviations


def property_values(images: np.ndarray, workers: int | None = None) -> np.ndarray:
    """(N, len(PROPERTY_NAMES)) float64 of (N, S, S, 3) uint8 images, NaN where a measurement
    failed (``workers``: as :func:`morphology.measure_all`)."""
    measured = morphology.measure_all(images, [stat for stat, _ in PROPERTIES.values()], workers=workers)
    return np.stack([measured[stat] for stat, _ in PROPERTIES.values()], axis=1).astype(np.float64)


def measure_properties(images: np.ndarray) -> np.ndarray:
    """:func:`property_values` of the training images, with a line of progress before and after."""
    t0 = time.time()
    log(f"measuring {len(PROPERTY_NAMES)} properties of {len(images)} training galaxies (--where, /info)")
    values = property_values(images)
    failed = int(np.isnan(values).all(axis=1).sum())
    log(f"measured {len(images)} training galaxies in {fmt_seconds(time.time() - t0)}"
        f"{f' ({failed} without a measurable central object)' if failed else ''}")
    return values


def property_ranges(names: Sequence[str], values: np.ndarray) -> dict[str, dict[str, Any]]:
    """{name: {min, median, max, unit, measured}} over the training galaxies (NaN left out;
    None where none was measured)."""
    out = {}
    for name, column in zip(names, np.asarray(values, np.float64).T):
        finite = column[np.isfinite(column)]
        stats = {k: (float(f(finite)) if len(finite) else None)
                 for k, f in (("min", np.min), ("median", np.median), ("max", np.max))}
        out[name] = {**stats, "unit": PROPERTIES.get(name, ("", ""))[1], "measured": int(len(finite))}
    return out


def robust_spread(values: np.ndarray) -> np.ndarray:
    """(P,) spread of each column of (N, P) ``values``, NaN left out: the interquartile range
    over 1.349, the standard deviation of a normal distribution with that IQR. Robust: a few
    galaxies measured far off (a bright neighbour, a failed fit) do not widen it. NaN for a
    column with fewer than two finite values."""
    values = np.asarray(values, np.float64)
    out = np.full(values.shape[1], np.nan)
    for j, column in enumerate(values.T):
        finite = column[np.isfinite(column)]
        if len(finite) >= 2:
            q1, q3 = np.percentile(finite, [25, 75])
            out[j] = (q3 - q1) / IQR_PER_SIGMA
    return out


def selected_images(where: str, columns: Mapping[str, np.ndarray], among: np.ndarray | None = None,
                    among_name: str = "", kernels_per_galaxy: int = 1) -> np.ndarray:
    """(N,) bool: the training galaxies that satisfy ``where`` (and are in ``among``, e.g. one
    class, described by ``among_name``). :class:`WhereError` when the expression is bad or fewer
    than :data:`MIN_MATCHES` galaxies match (the message counts their kernels too)."""
    mask = where_mask(where, columns)
    pool = int(len(mask) if among is None else among.sum())
    if among is not None:
        mask = mask & among
    matched = int(mask.sum())
    if matched < MIN_MATCHES:
        raise WhereError(f"where {where!r}: {matched} of the {pool} training galaxies{among_name} match "
                         f"({matched * kernels_per_galaxy} kernels), fewer than the {MIN_MATCHES} galaxies a draw "
                         "needs; widen the ranges (/info gives each property's min, median and max)")
    return mask

