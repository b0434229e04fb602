"""High-pass sharpness of a galaxy: fine structure in its own segment, with pixel noise removed.

The structure-band power deficit (:mod:`.metrics`) compares whole-image spectra; pixel noise,
JPEG blocks or a decoder's speckle raise it as much as real detail does. This statistic is
measured per image, on the galaxy only, and subtracts what the image's own noise contributes,
so noise cannot fake it (docs/morphology.md, "High-pass sharpness"):

    highpass = (mean_seg (L - G_s * L)^2 - P_noise) / mean_seg(L)^2

on the sky-subtracted luminance L, G_s a Gaussian of sigma :data:`SIGMA` px, "seg" the
central object's segment (:func:`morphology.segment`, the one every morphology statistic uses)
and P_noise the high-pass power of the sky's noise (:func:`noise_power`). Dividing by the
squared mean surface brightness of the segment makes it dimensionless and independent of the
galaxy's brightness: it is the fractional power of the structure finer than about 2 s px.
Like A and S it can be slightly negative for a smooth galaxy whose noise estimate is high.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from scipy import ndimage

from ray_galaxy.evaluation.distances import wasserstein_table
from ray_galaxy.images import luminance
from ray_galaxy.morphology import MIN_SKY_PIXELS, blank_sky, segment, sky

STAT = "highpass"
LABEL = "high-pass sharpness"
SIGMA = 1.0  # px: structure finer than ~2 px (about 16-32 cycles per 64-px image) is what blur removes first
SETS = ("real", "generated", "means")


def highpass(lum: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """``lum`` minus its Gaussian-smoothed copy (sigma in px, reflected at the edges)."""
    return lum - ndimage.gaussian_filter(lum, sigma)


def white_noise_gain(sigma: float = SIGMA) -> float:
    """Variance of :func:`highpass` of unit white noise: the sum of the squared weights of the
    kernel delta - G_sigma, from filtering an impulse (exact for scipy's truncated, discrete
    Gaussian; about 1 - 3 / (4 pi sigma^2) for wide kernels)."""
    half = int(math.ceil(4 * sigma)) + 1  # scipy truncates the kernel at 4 sigma
    impulse = np.zeros((2 * half + 1, 2 * half + 1))
    impulse[half, half] = 1.0
    return float((highpass(impulse, sigma) ** 2).sum())


def noise_power(hp: np.ndarray, sky_mask: np.ndarray, noise: float, sigma: float = SIGMA) -> float:
    """The high-pass power per pixel that the image's pixel noise contributes.

    Measured where there is only noise: the mean hp^2 over the blank-sky pixels whose whole
    kernel (3 sigma) is blank sky, so no source light leaks in. That is sigma_n^2 times
    :func:`white_noise_gain` for white noise of variance sigma_n^2, and it stays right for the
    correlated noise of resampled JPEGs (neighbour correlation ~0.6 in GZ2 crops), whose power
    sits at lower frequencies and which the white-noise formula would over-subtract. With fewer
    than MIN_SKY_PIXELS such pixels (noise-free decoder outputs have no blank sky), the
    white-noise value for the frame's noise sigma (:func:`morphology.sky`) instead.
    """
    reach = int(math.ceil(3 * sigma))
    core = ndimage.binary_erosion(sky_mask, iterations=reach, border_value=1) if reach else sky_mask
    if core.sum() >= MIN_SKY_PIXELS:
        return float(np.mean(hp[core] ** 2))
    return noise ** 2 * white_noise_gain(sigma)


def measure(image: np.ndarray, sigma: float = SIGMA) -> float:
    """High-pass sharpness of one (S, S, 3) image (uint8 or float in [0, 1]); NaN when it has no
    usable central object (the same cases as :func:`morphology.measure`)."""
    lum = luminance(image)
    bg, noise = sky(lum)
    lum = lum - bg
    seg = segment(lum, noise)
    if seg is None:
        return math.nan
    obj, others = seg
    flux = float(lum[obj].mean()) if obj.sum() >= 4 else 0.0
    if flux <= 0:
        return math.nan
    hp = highpass(lum, sigma)
    p_noise = noise_power(hp, blank_sky(lum) & ~obj & ~others, noise, sigma)
    return float((np.mean(hp[obj] ** 2) - p_noise) / flux ** 2)


def measure_all(images: Iterable[np.ndarray]) -> np.ndarray:
    """(N,) high-pass sharpness of many images, NaN where the measurement failed."""
    return np.array([measure(im) for im in images], dtype=np.float64)


def scores(values: dict[str, np.ndarray | None], seed: int = 0) -> dict[str, object]:
    """Medians of the sets in :data:`SETS` (None when a set is absent), the normalised
    Wasserstein distance of generated and of means to real with the real halves' floor
    (:func:`distances.wasserstein_table`), and the failed fractions."""
    real = values["real"]
    out: dict[str, object] = {"sigma_px": SIGMA, "median": {}, "distance": {}, "failed_fraction": {}}
    for name in SETS:
        v = values.get(name)
        ok = v is not None and np.isfinite(v).any()
        out["median"][name] = float(np.nanmedian(v)) if ok else None
        out["failed_fraction"][name] = float(np.mean(~np.isfinite(v))) if v is not None and len(v) else None
        if name != "real":
            table = wasserstein_table({STAT: real}, {STAT: v}, seed)[STAT] if v is not None else None
            out["distance"][name] = table["distance"] if table else None
            if table:
                out["floor"] = table["floor"]
    return out
