"""Non-parametric morphology and power spectra of galaxy images (numpy; scipy.ndimage for masks).

Every statistic is measured the same way on real and on generated images, so their
*distributions* can be compared; absolute values follow the usual definitions closely but are
not meant to reproduce catalogue values to the last digit (no PSF, no survey calibration).

Per image (``measure``), on the background-subtracted luminance L = mean(R, G, B):

1. **Background and noise** from the outer frame (width S/8): sky = median; noise = 1.4826 MAD
   after removing a smoothed copy (so gradients of galaxy wings are not counted as noise).
2. **Segmentation** of the central object: L smoothed by a Gaussian (sigma 1 px) above
   ``max(k_sigma * noise_smoothed, rel_peak * central peak)``; the connected component that
   holds the centre (else the brightest one within S/4 of it), holes filled. The relative floor
   keeps noise-free decoder outputs and noisy real images on an equal footing.
3. **CAS** (Conselice 2003, ApJS 147, 1; Bershady, Jangren & Conselice 2000, AJ 119, 2645;
   Conselice, Bershady & Jangren 2000, ApJ 529, 886), on L with *other* sources masked out,
   in circular apertures about the centre:

   * Petrosian radius r_p: where the surface brightness in the annulus 0.8 r..1.25 r is 0.2
     times the mean surface brightness inside r (eta = 0.2).
   * Concentration ``C = 5 log10(r80 / r20)``, radii enclosing 20 / 80 % of the flux within
     1.5 r_p (curve of growth with 4x4 sub-pixel sampling). Gaussian: 2.14; exponential
     disk: 2.70; de Vaucouleurs: ~5.
   * Asymmetry ``A = min_centre sum|I - I_180| / sum|I| - A_bg`` within 1.5 r_p; the centre is
     searched on a half-pixel grid, where a 180-degree rotation maps pixels onto pixels exactly
     (no interpolation). ``A_bg = N_pix * 2 sigma / sqrt(pi) / sum|I|`` is the expected value
     for white sky noise (Conselice measures it on a blank patch instead).
   * Smoothness (clumpiness) ``S = sum(I - I_smooth)_+ / sum I - S_bg`` over
     0.25 r_p < r < 1.5 r_p, with a boxcar of about 0.25 r_p (odd width >= 3), as in
     Lotz et al. 2004; without Conselice's factor 10 (as in statmorph). ``S_bg`` is again the
     white-noise expectation.
4. **Gini and M20** (Lotz, Primack & Madau 2004, AJ 128, 163) over the segment's pixels:
   ``G = sum_i (2i - n - 1) |X_i| / (mean|X| n (n - 1))`` for ascending |X_i|
   (0: all pixels equal, 1: all light in one pixel);
   ``M20 = log10(sum_{brightest 20 % of flux} M_i / M_tot)``, ``M_i = f_i r_i^2`` about the
   centre minimising M_tot (the flux-weighted centroid). Bulge-dominated: about -2.5;
   clumpy or merging: about -1.
5. **Half-light radius** r50 (pixels), from the same curve of growth as C.
6. **Ellipticity** ``1 - b/a`` with ``b/a = sqrt(lambda_min / lambda_max)`` of the flux-weighted
   second-moment matrix of the segment.
7. **Colour** ``-2.5 log10(F_blue / F_red)`` of the background-subtracted B and R channel fluxes
   in the segment (a g - i like index for SDSS gri composites: larger is redder).

An image without a usable central object gives NaN for every statistic (counted by callers).

The sky frame, luminance and the power spectra behind the sharpness metric live in
:mod:`ray_galaxy.images` (the residual detail model measures them the same way).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance

from ray_galaxy.images import as_float_rgb, border

STATS = ("concentration", "asymmetry", "smoothness", "gini", "m20", "r_half", "ellipticity", "colour")
LABELS = {
    "concentration": "concentration C", "asymmetry": "asymmetry A", "smoothness": "smoothness S",
    "gini": "Gini G", "m20": "M20", "r_half": "half-light radius (px)",
    "ellipticity": "ellipticity 1 - b/a", "colour": "colour -2.5 log10(B/R)",
}
PETRO_ETA = 0.2
PETRO_EXTENT = 1.5
M20_FLOOR = 1e-4  # M20 >= -4: a single-pixel source would otherwise give log10(0)


# --------------------------------------------------------------------------- sky and noise


HIGHPASS = 2.0  # sigma (px) of the smooth component removed before measuring noise


def noise_sigma(a: np.ndarray) -> float:
    """Pixel noise sigma of a 2-D image from its frame, insensitive to smooth gradients.

    1.4826 MAD of the frame after subtracting a Gaussian-smoothed copy (sigma 2 px), scaled
    back by the variance that high-pass keeps of white noise, 1 - 3 / (4 pi s^2). A plain MAD
    of the frame would count the wings of the galaxy and of neighbours as "noise": on
    noise-free decoder outputs it is several times the real pixel noise.
    """
    hp = border(a - ndimage.gaussian_filter(a, HIGHPASS))
    mad = float(np.median(np.abs(hp - np.median(hp))))
    return 1.4826 * mad / math.sqrt(1 - 3 / (4 * math.pi * HIGHPASS ** 2))


def sky(a: np.ndarray) -> tuple[float, float]:
    """(background level, noise sigma) of a 2-D image from its frame: median and :func:`noise_sigma`."""
    return float(np.median(border(a))), noise_sigma(a)


# --------------------------------------------------------------------------- segmentation


def segment(lum: np.ndarray, noise: float, k_sigma: float = 2.0, rel_peak: float = 0.05,
            smooth: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
    """(central object mask, mask of the other sources) of background-subtracted luminance.

    None when nothing is detected near the centre.
    """
    s = lum.shape[0]
    sm = ndimage.gaussian_filter(lum, smooth)
    noise_sm = noise_sigma(sm)
    yy, xx = np.indices(lum.shape)
    c = (s - 1) / 2
    central = (yy - c) ** 2 + (xx - c) ** 2 <= (s / 4) ** 2
    peak = float(sm[central].max())
    if peak <= 0:
        return None
    labels, n = ndimage.label(sm > max(k_sigma * noise_sm, rel_peak * peak, 1e-9))
    if n == 0:
        return None
    centre_label = labels[int(round(c)), int(round(c))]
    if centre_label == 0:
        flux = ndimage.sum(np.where(central, sm, 0), labels, index=np.arange(1, n + 1))
        if flux.max() <= 0:
            return None
        centre_label = int(np.argmax(flux)) + 1
    obj = ndimage.binary_fill_holes(labels == centre_label)
    others = (labels > 0) & ~obj
    return obj, others


# --------------------------------------------------------------------------- radial profiles


class Growth:
    """Curve of growth F(<r) of an image about (cy, cx).

    Each pixel is split into sub x sub points; their flux is binned in radius (bins of
    ``dr`` pixels), so F is exact to within a bin for any radius, including sub-pixel ones.
    """

    def __init__(self, img: np.ndarray, cy: float, cx: float, sub: int = 4, dr: float = 0.05) -> None:
        off = (np.arange(sub) + 0.5) / sub - 0.5
        yy, xx = np.indices(img.shape)
        r = np.hypot(yy[..., None, None] + off[:, None] - cy, xx[..., None, None] + off[None, :] - cx)
        idx = (r / dr).astype(np.int64).ravel()
        w = np.broadcast_to(img[..., None, None] / sub ** 2, r.shape).ravel()
        # Edges dr, 2 dr, ...: flux inside each edge (a point on an edge counts as outside).
        self.r = dr * np.arange(1, idx.max() + 2)
        self.cum = np.cumsum(np.bincount(idx, weights=w))
        self.rising = np.maximum.accumulate(self.cum)

    def flux(self, radius: float | np.ndarray) -> np.ndarray:
        """Flux within ``radius`` (linear between bin edges)."""
        return np.interp(radius, np.r_[0.0, self.r], np.r_[0.0, self.cum])

    def radius(self, flux: float) -> float:
        """Smallest radius enclosing ``flux`` (linear between bin edges)."""
        i = int(np.searchsorted(self.rising, flux))
        if i >= len(self.r):
            return float(self.r[-1])
        c0, r0 = (self.rising[i - 1], self.r[i - 1]) if i > 0 else (0.0, 0.0)
        c1 = self.rising[i]
        f = (flux - c0) / (c1 - c0) if c1 > c0 else 0.0
        return float(r0 + f * (self.r[i] - r0))


def petrosian_radius(growth: Growth, r_max: float, eta: float = PETRO_ETA) -> float:
    """Circular Petrosian radius: SB(0.8 r..1.25 r) / mean SB(< r) = eta (linear interpolation)."""
    r = np.arange(1.0, r_max, 0.25)
    if len(r) < 2:
        return r_max
    annulus = (growth.flux(1.25 * r) - growth.flux(0.8 * r)) / (math.pi * (1.25 ** 2 - 0.8 ** 2) * r ** 2)
    inside = growth.flux(r) / (math.pi * r ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(inside > 0, annulus / inside, 1.0)
    below = np.nonzero(ratio < eta)[0]
    if len(below) == 0:
        return r_max
    i = below[0]
    if i == 0:
        return float(r[0])
    f = (ratio[i - 1] - eta) / (ratio[i - 1] - ratio[i])
    return float(r[i - 1] + f * (r[i] - r[i - 1]))


# --------------------------------------------------------------------------- the statistics


def gini(values: np.ndarray) -> float:
    """Gini coefficient of |values| (Lotz et al. 2004, eq. 6): 0 uniform, 1 one pixel has it all."""
    x = np.sort(np.abs(np.asarray(values, np.float64).ravel()))
    n = len(x)
    if n < 2 or x.sum() <= 0:
        return math.nan
    i = np.arange(1, n + 1)
    return float(np.sum((2 * i - n - 1) * x) / (x.mean() * n * (n - 1)))


def _weighted_centre(img: np.ndarray, mask: np.ndarray) -> tuple:
    """(flux, total, yy, xx, cy, cx): non-negative flux of ``img`` in ``mask`` and its centroid."""
    f = np.where(mask, np.clip(img, 0, None), 0.0)
    total = f.sum()
    yy, xx = np.indices(f.shape)
    if total <= 0:
        return f, total, yy, xx, math.nan, math.nan
    return f, total, yy, xx, (f * yy).sum() / total, (f * xx).sum() / total


def m20(img: np.ndarray, mask: np.ndarray) -> float:
    """M20 (Lotz et al. 2004, eqs. 7-8) of the non-negative flux of ``img`` inside ``mask``."""
    f, total, yy, xx, cy, cx = _weighted_centre(img, mask)  # the centre minimises M_tot
    if total <= 0:
        return math.nan
    mi = f * ((yy - cy) ** 2 + (xx - cx) ** 2)
    m_tot = mi.sum()
    if m_tot <= 0:
        return math.log10(M20_FLOOR)
    flat, order = f.ravel(), np.argsort(-f.ravel(), kind="stable")
    cum = np.cumsum(flat[order])
    n_top = int(np.searchsorted(cum, 0.2 * total)) + 1  # up to and including the pixel crossing 20 %
    ratio = mi.ravel()[order[:n_top]].sum() / m_tot
    return float(math.log10(max(ratio, M20_FLOOR)))


def ellipticity(img: np.ndarray, mask: np.ndarray) -> float:
    """1 - b/a from the flux-weighted second moments of the non-negative flux in ``mask``."""
    f, total, yy, xx, cy, cx = _weighted_centre(img, mask)
    if total <= 0:
        return math.nan
    dy, dx = yy - cy, xx - cx
    cov = np.array([[(f * dx * dx).sum(), (f * dx * dy).sum()],
                    [(f * dx * dy).sum(), (f * dy * dy).sum()]]) / total
    lo, hi = np.linalg.eigvalsh(cov)
    if hi <= 0:
        return math.nan
    return float(1 - math.sqrt(max(lo, 0.0) / hi))


def asymmetry(img: np.ndarray, cy: float, cx: float, radius: float, noise: float,
              search: float = 1.0, max_rounds: int = 6) -> float:
    """Rotational asymmetry within ``radius``, minimised over centres on a half-pixel grid."""
    h, w = img.shape
    yy, xx = np.indices(img.shape)

    def a_at(cy2: int, cx2: int) -> tuple[float, float]:  # centre = (cy2 / 2, cx2 / 2)
        ry, rx = cy2 - yy, cx2 - xx
        ok = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
        ap = ok & ((2 * yy - cy2) ** 2 + (2 * xx - cx2) ** 2 <= (2 * radius) ** 2)
        rot = img[np.clip(ry, 0, h - 1), np.clip(rx, 0, w - 1)]
        denom = np.abs(img[ap]).sum()
        if denom <= 0:
            return math.inf, 0.0
        a = np.abs(img[ap] - rot[ap]).sum() / denom
        return a, ap.sum() * 2 * noise / math.sqrt(math.pi) / denom

    best = (int(round(2 * cy)), int(round(2 * cx)))
    reach = int(2 * search)
    steps = range(-reach, reach + 1)
    for _ in range(max_rounds):  # re-centre the search window while the minimum is on its edge
        cands = [(best[0] + i, best[1] + j) for i in steps for j in steps]
        values = [a_at(*c) for c in cands]
        k = int(np.argmin([v[0] for v in values]))
        edge = max(abs(cands[k][0] - best[0]), abs(cands[k][1] - best[1])) == reach
        best, (a, a_bg) = cands[k], values[k]
        if not edge:
            break
    return float(a - a_bg) if math.isfinite(a) else math.nan


def smoothness(img: np.ndarray, cy: float, cx: float, r_petro: float, noise: float) -> float:
    """Clumpiness over 0.25 r_p < r < 1.5 r_p with a boxcar of about 0.25 r_p (Lotz et al. 2004)."""
    k = max(3, 2 * int(round(0.125 * r_petro)) + 1)
    residual = np.clip(img - ndimage.uniform_filter(img, size=k, mode="constant"), 0, None)
    yy, xx = np.indices(img.shape)
    r = np.hypot(yy - cy, xx - cx)
    ann = (r > 0.25 * r_petro) & (r < PETRO_EXTENT * r_petro)
    total = img[ann].sum()
    if total <= 0:
        return math.nan
    s_bg = ann.sum() * noise * math.sqrt(1 - 1 / k ** 2) / math.sqrt(2 * math.pi) / total
    return float(residual[ann].sum() / total - s_bg)


def colour(rgb: np.ndarray, mask: np.ndarray) -> float:
    """-2.5 log10(F_B / F_R) of the sky-subtracted channel fluxes within ``mask``."""
    fr, fb = (float((rgb[..., ch] - sky(rgb[..., ch])[0])[mask].sum()) for ch in (0, 2))
    if fr <= 0 or fb <= 0:
        return math.nan
    return float(-2.5 * math.log10(fb / fr))


def measure(image: np.ndarray) -> dict[str, float]:
    """Every statistic in :data:`STATS` for one (S, S, 3) image (uint8 or float in [0, 1])."""
    rgb = as_float_rgb(image)
    lum = rgb.mean(-1)
    bg, noise = sky(lum)
    lum = lum - bg
    seg = segment(lum, noise)
    if seg is None:
        return {k: math.nan for k in STATS}
    obj, others = seg
    f = np.where(obj, np.clip(lum, 0, None), 0.0)
    total = f.sum()
    if total <= 0 or obj.sum() < 4:
        return {k: math.nan for k in STATS}
    yy, xx = np.indices(f.shape)
    cy, cx = (f * yy).sum() / total, (f * xx).sum() / total
    cas = np.where(others, 0.0, lum)  # neighbours masked, the object's own faint wings kept
    r_max = lum.shape[0] / 2
    growth = Growth(cas, cy, cx)
    r_p = petrosian_radius(growth, r_max)
    f_tot = float(growth.flux(min(PETRO_EXTENT * r_p, math.sqrt(2) * r_max)))
    r20, r50, r80 = (growth.radius(q * f_tot) for q in (0.2, 0.5, 0.8))
    conc = 5 * math.log10(r80 / r20) if r20 > 0 and r80 > 0 else math.nan
    return {
        "concentration": conc,
        "asymmetry": asymmetry(cas, cy, cx, PETRO_EXTENT * r_p, noise),
        "smoothness": smoothness(cas, cy, cx, r_p, noise),
        "gini": gini(lum[obj]),
        "m20": m20(lum, obj),
        "r_half": r50,
        "ellipticity": ellipticity(lum, obj),
        "colour": colour(rgb, obj),
    }


def measure_all(images: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """{statistic: (N,) float array, NaN where the measurement failed} for many images."""
    rows = [measure(im) for im in images]
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in STATS}


# --------------------------------------------------------------------------- distributions


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
