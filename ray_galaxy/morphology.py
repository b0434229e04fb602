"""Non-parametric morphology of galaxy images, following statmorph (numpy; scipy.ndimage).

Every statistic is measured the same way on real and on generated images, so their
*distributions* can be compared (the evaluation), and on every training image when a sampler is
fitted (its per-kernel properties, :mod:`ray_galaxy.generation.properties`): both layers call
this one module, which sits below them. The definitions are statmorph's (Rodriguez-Gomez et al. 2019,
the reference implementation of Lotz, Primack & Madau 2004 and Conselice 2003);
docs/morphology.md gives them in full, the agreement with statmorph on Galaxy Zoo 2 crops
(benchmarks/morphology_vs_statmorph.py) and the three places where we differ on purpose:
asymmetry centres on a half-pixel grid (no interpolation), centred even boxcars in the
smoothness, and background terms over the pixels actually summed. statmorph is only the
reference in tests and benchmarks (it takes ~0.5 s per 64-px image; this module ~15 ms).

Per image (``measure``), on the background-subtracted luminance L = mean(R, G, B):
sky level and noise from the outer frame (:func:`sky`); the central object's segment and the
other sources (:func:`segment`), which are masked; the blank sky (:func:`blank_sky`), where the
background terms of A and S are measured; Petrosian radii (eta 0.2, annulus
r +- 0.5 px) about the centroid, about the asymmetry centre and in ellipses. Then
concentration C = 5 log10(r80/r20), r50 and the flux within 1.5 r_p, asymmetry A within 1.5 r_p,
smoothness S over 0.25-1.5 r_p (all circular, about the asymmetry centre), Gini and M20 over
the Gini segment (:func:`gini_segment`), ellipticity from the segment's second moments, and a
colour index -2.5 log10(F_B / F_R) in the segment (larger is redder; not in statmorph).
An image without a usable central object gives NaN for every statistic (counted by callers).

The sky frame, luminance and the power spectra behind the sharpness metric live in
:mod:`ray_galaxy.images` (the residual detail model measures them the same way).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from ray_galaxy.images import as_float_rgb, border
from ray_galaxy.parallel import ordered_map

# The statistics the evaluation compares (distances, charts); :func:`measure` also gives MEASURED.
STATS = ("concentration", "asymmetry", "smoothness", "gini", "m20", "r_half", "ellipticity", "colour")
# Flux depends on the image's brightness scale, not on shape: not a morphology distance term,
# but a property a sampler's kernels are selected by.
MEASURED = STATS + ("flux",)
LABELS = {
    "concentration": "concentration C", "asymmetry": "asymmetry A", "smoothness": "smoothness S",
    "gini": "Gini G", "m20": "M20", "r_half": "half-light radius (px)",
    "ellipticity": "ellipticity 1 - b/a", "colour": "colour -2.5 log10(B/R)", "flux": "flux (image units)",
}
PETRO_ETA = 0.2
PETRO_EXTENT = 1.5  # CAS apertures, in Petrosian radii
PETRO_FRACTION_CAS = 0.25  # smoothness: boxcar width and inner radius, in Petrosian radii
PETRO_FRACTION_GINI = 0.2  # Gini segment: Gaussian sigma, in elliptical Petrosian radii
ANNULUS = 1.0  # width (px) of the Petrosian annulus
M20_FLOOR = 1e-4  # M20 >= -4: a single-pixel source would otherwise give log10(0)
MIN_SOURCE_PIXELS = 10  # smaller detections besides the central object are noise
MIN_SKY_PIXELS = 64  # sky pixels (pairs) needed to measure the A and S backgrounds on them


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


def boxcar(img: np.ndarray, width: int) -> np.ndarray:
    """Mean over a width x width box centred on each pixel (reflected at the edges).

    An even width spans width + 1 pixels with half weights at both ends, so the box stays centred
    (scipy's even uniform_filter, which statmorph uses, is shifted by half a pixel: on a smooth
    profile that alone gives S ~ 0.5 |grad I| / I).
    """
    w = np.ones(width) / width if width % 2 else np.r_[0.5, np.ones(width - 1), 0.5] / width
    return ndimage.correlate1d(ndimage.correlate1d(img, w, 0, mode="reflect"), w, 1, mode="reflect")


def sky_smoothness(img: np.ndarray, sky: np.ndarray, noise: float, width: int) -> float:
    """Mean (I - I_box)_+ per sky pixel, over the ``sky`` pixels whose whole box is sky;
    without any, the white-noise value sigma sqrt(1 - 1/width^2) / sqrt(2 pi)."""
    if width < 2:
        return 0.0  # no smoothing, no residual
    core = ndimage.binary_erosion(sky, np.ones((width + 1, width + 1), bool))
    if core.sum() < MIN_SKY_PIXELS:
        return noise * math.sqrt(1 - 1 / width ** 2) / math.sqrt(2 * math.pi)
    return float(np.clip(img - boxcar(img, width), 0, None)[core].mean())


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
    # Other sources: at least MIN_SOURCE_PIXELS (as photutils' n_pixels), so that noise peaks
    # are not masked.
    area = np.bincount(labels.ravel(), minlength=n + 1)
    others = (area[labels] >= MIN_SOURCE_PIXELS) & (labels > 0) & ~obj
    return obj, others


def blank_sky(lum: np.ndarray, k_sigma: float = 2.0, smooth: float = 1.0, margin: int = 2) -> np.ndarray:
    """(S, S) bool: no source detected at the noise level (the 1-px-smoothed image above
    ``k_sigma`` times its noise, MIN_SOURCE_PIXELS or more, grown by ``margin`` px).

    statmorph's sky lies outside a noise-level segmentation too; :func:`segment`'s relative
    floor would leave the galaxy's faint outskirts in it. Empty on noise-free images, which
    then get the (zero) white-noise background terms.
    """
    sm = ndimage.gaussian_filter(lum, smooth)
    labels, n = ndimage.label(sm > k_sigma * noise_sigma(sm))
    area = np.bincount(labels.ravel(), minlength=n + 1)
    sources = (area[labels] >= MIN_SOURCE_PIXELS) & (labels > 0)
    # (iterations=0 would mean 'until nothing changes' to scipy)
    return ~(ndimage.binary_dilation(sources, iterations=margin) if margin > 0 else sources)


# --------------------------------------------------------------------------- radial profiles


def radius_bins(shape: tuple[int, int], cy: float, cx: float, sub: int = 4, dr: float = 0.05,
                elongation: float = 1.0, theta: float = 0.0) -> np.ndarray:
    """Radius bin (width ``dr``) of each of sub x sub points per pixel, pixel-major: the geometry
    of a :class:`Growth`, computed once for every image measured about the same centre."""
    off = (np.arange(sub) + 0.5) / sub - 0.5
    # (H, 1, sub, 1) and (1, W, 1, sub) offsets broadcast to (H, W, sub, sub) points.
    dy = (np.arange(shape[0])[:, None, None, None] + off[None, None, :, None] - cy).astype(np.float32)
    dx = (np.arange(shape[1])[None, :, None, None] + off[None, None, None, :] - cx).astype(np.float32)
    if elongation != 1.0:  # semi-major axis of the ellipse through each point
        c, s = np.float32(math.cos(theta)), np.float32(math.sin(theta))
        dx, dy = dx * c + dy * s, (dy * c - dx * s) * np.float32(elongation)
    r = np.sqrt(dy * dy + dx * dx) / np.float32(dr)
    return np.broadcast_to(r, (*shape, sub, sub)).astype(np.int64).ravel()


class Growth:
    """Curve of growth F(<r) of an image about (cy, cx), in circles or in ellipses.

    Each pixel is split into sub x sub points; their flux is binned in radius (bins of ``dr``
    pixels), so F is exact to within a bin for any radius, including sub-pixel ones. With
    ``elongation`` a/b > 1 the radius is the semi-major axis of the ellipse through the point,
    the major axis at ``theta`` (radians, from +x towards +y). ``bins`` (from
    :func:`radius_bins` with the same arguments) skips recomputing the geometry.
    """

    def __init__(self, img: np.ndarray, cy: float, cx: float, sub: int = 4, dr: float = 0.05,
                 elongation: float = 1.0, theta: float = 0.0, bins: np.ndarray | None = None) -> None:
        if bins is None:
            bins = radius_bins(img.shape, cy, cx, sub, dr, elongation, theta)
        w = np.repeat(np.asarray(img, np.float64).ravel() / sub ** 2, sub * sub)
        # Edges dr, 2 dr, ...: flux inside each edge (a point on an edge counts as outside).
        self.r = dr * np.arange(1, bins.max() + 2)
        self.cum = np.cumsum(np.bincount(bins, weights=w, minlength=len(self.r)))
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


def apertures(img: np.ndarray, valid: np.ndarray, cy: float, cx: float, elongation: float = 1.0,
              theta: float = 0.0) -> tuple[Growth, Growth]:
    """(flux, area) curves of growth of the ``valid`` (unmasked) pixels of ``img``: aperture
    means that leave masked and off-image pixels out of the area, as statmorph's do."""
    bins = radius_bins(img.shape, cy, cx, elongation=elongation, theta=theta)
    return (Growth(np.where(valid, img, 0.0), cy, cx, bins=bins),
            Growth(valid.astype(np.float64), cy, cx, bins=bins))


def petrosian_radius(flux: Growth, area: Growth, r_max: float, eta: float = PETRO_ETA) -> float:
    """Petrosian radius (semi-major axis for elliptical curves): the first r where the mean
    surface brightness on r +- 0.5 px is ``eta`` times the mean inside r (linear interpolation)."""
    r = np.arange(ANNULUS, r_max, 0.25)
    if len(r) < 2:
        return r_max
    ann_f = np.abs(flux.flux(r + ANNULUS / 2) - flux.flux(r - ANNULUS / 2))
    ann_a = area.flux(r + ANNULUS / 2) - area.flux(r - ANNULUS / 2)
    in_f, in_a = np.abs(flux.flux(r)), area.flux(r)
    ann = np.divide(ann_f, ann_a, out=np.zeros_like(r), where=ann_a > 0)
    inside = np.divide(in_f, in_a, out=np.zeros_like(r), where=in_a > 0)
    ratio = np.divide(ann, inside, out=(ann > 0).astype(np.float64), where=inside > 0)
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


def centroid(f: np.ndarray) -> tuple[float, float]:
    """Flux-weighted (cy, cx) of a 2-D array (NaN when its sum is not positive)."""
    total = f.sum()
    if total <= 0:
        return math.nan, math.nan
    yy, xx = np.indices(f.shape)
    return float((f * yy).sum() / total), float((f * xx).sum() / total)


def shape(f: np.ndarray, cy: float, cx: float) -> tuple[float, float]:
    """(elongation a/b, angle of the major axis) of the second moments of ``f`` about (cy, cx)."""
    yy, xx = np.indices(f.shape)
    dy, dx = yy - cy, xx - cx
    x2, y2, xy = (f * dx * dx).sum(), (f * dy * dy).sum(), (f * dx * dy).sum()
    lo, hi = np.linalg.eigvalsh(np.array([[x2, xy], [xy, y2]]) / f.sum())
    if hi <= 0:
        return math.nan, 0.0
    return math.sqrt(hi / max(lo, 1e-12 * hi)), 0.5 * math.atan2(2 * xy, x2 - y2)


def m20(img: np.ndarray, mask: np.ndarray) -> float:
    """M20 (Lotz et al. 2004, eqs. 7-8) of ``img`` inside ``mask``, about its centroid.

    The brightest 20 %: every pixel at least as bright as the one at which the ascending
    cumulative flux reaches 80 % (statmorph's rule).
    """
    f = np.where(mask, img, 0.0)
    total = f.sum()
    if total <= 0:
        return math.nan
    cy, cx = centroid(f)
    yy, xx = np.indices(f.shape)
    mi = f * ((yy - cy) ** 2 + (xx - cx) ** 2)
    m_tot = mi.sum()
    if m_tot <= 0:
        return math.log10(M20_FLOOR)
    vals = np.sort(f[mask])
    threshold = vals[np.searchsorted(np.cumsum(vals), 0.8 * total * (1 - 1e-12))]
    ratio = mi[mask & (f >= threshold)].sum() / m_tot
    return float(math.log10(max(ratio, M20_FLOOR)))


def gini_segment(img: np.ndarray, cy: float, cx: float, a_p: float, elongation: float,
                 theta: float) -> np.ndarray | None:
    """Lotz et al. 2004's pixels for Gini and M20 (statmorph's ``segmap_gini``).

    ``img`` smoothed by a Gaussian of sigma 0.2 a_p, above its mean on the elliptical Petrosian
    annulus a_p +- 0.5 px about (cy, cx); the 8-connected part that holds the brightest
    smoothed pixel. None when nothing or everything is above.
    """
    sm = ndimage.gaussian_filter(img, PETRO_FRACTION_GINI * a_p, mode="constant")
    g = Growth(sm, cy, cx, elongation=elongation, theta=theta)
    a_in, a_out = max(a_p - ANNULUS / 2, 0.0), a_p + ANNULUS / 2
    level = (g.flux(a_out) - g.flux(a_in)) / (math.pi * (a_out ** 2 - a_in ** 2) / elongation)
    above = sm >= level
    if not above.any() or above.all():
        return None
    labels, _ = ndimage.label(above, structure=np.ones((3, 3)))
    return labels == labels[np.unravel_index(np.argmax(sm), sm.shape)]


def ellipticity(img: np.ndarray, mask: np.ndarray) -> float:
    """1 - b/a from the flux-weighted second moments of ``img`` in ``mask`` about its centroid."""
    f = np.where(mask, img, 0.0)
    cy, cx = centroid(f)
    if math.isnan(cy):
        return math.nan
    return 1 - 1 / shape(f, cy, cx)[0]


def sky_asymmetry(diff: np.ndarray, pairs: np.ndarray, noise: float) -> float:
    """Background |I - I_180| per pixel: its mean over the sky-sky ``pairs`` of the galaxy's own
    rotation (the galaxy's symmetric wings cancel there, and noise pairs are far apart, so noise
    correlations do not matter); with fewer than MIN_SKY_PIXELS, the white-noise value
    2 sigma / sqrt(pi)."""
    if pairs.sum() >= MIN_SKY_PIXELS:
        return float(diff[pairs].mean())
    return 2 * noise / math.sqrt(math.pi)


def asymmetry(img: np.ndarray, valid: np.ndarray, cy: float, cx: float, radius: float,
              sky: np.ndarray, noise: float, search: float = 1.0,
              max_rounds: int = 6) -> tuple[float, float, float]:
    """(A, cy, cx): rotational asymmetry within ``radius`` about the centre that minimises it.

    ``A = (sum|I - I_180| - N A_sky) / sum|I|`` over the N pixels used (Lotz et al. 2004, eq. 10);
    pixels whose partner is masked or off the image are left out. The centre minimises
    sum|I - I_180| / sum|I| on a half-pixel grid, where a 180-degree rotation maps pixels onto
    pixels exactly; A_sky is :func:`sky_asymmetry` at that centre.
    """
    h, w = img.shape
    yy, xx = np.indices(img.shape)

    def rotated(cy2: int, cx2: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
        ry, rx = cy2 - yy, cx2 - xx  # partner of each pixel about (cy2 / 2, cx2 / 2)
        ry_c, rx_c = np.clip(ry, 0, h - 1), np.clip(rx, 0, w - 1)
        ok = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w) & valid & valid[ry_c, rx_c]
        ap = ok & ((2 * yy - cy2) ** 2 + (2 * xx - cx2) ** 2 <= (2 * radius) ** 2)
        return ok, ap, np.abs(img - img[ry_c, rx_c]), (ry_c, rx_c)

    def raw(cy2: int, cx2: int) -> float:
        _, ap, diff, _ = rotated(cy2, cx2)
        denom = np.abs(img[ap]).sum()
        return diff[ap].sum() / denom if denom > 0 else math.inf

    best = (int(round(2 * cy)), int(round(2 * cx)))
    reach = int(2 * search)
    steps = range(-reach, reach + 1)
    for _ in range(max_rounds):  # re-centre the search window while the minimum is on its edge
        cands = [(best[0] + i, best[1] + j) for i in steps for j in steps]
        k = int(np.argmin([raw(*c) for c in cands]))
        edge = max(abs(cands[k][0] - best[0]), abs(cands[k][1] - best[1])) == reach
        best = cands[k]
        if not edge:
            break
    ok, ap, diff, partner = rotated(*best)
    denom = np.abs(img[ap]).sum()
    if denom <= 0:
        return math.nan, best[0] / 2, best[1] / 2
    sky_a = sky_asymmetry(diff, ok & sky & sky[partner], noise)
    return float((diff[ap].sum() - ap.sum() * sky_a) / denom), best[0] / 2, best[1] / 2


def smoothness(img: np.ndarray, cy: float, cx: float, r_petro: float, sky_s: float) -> float:
    """Clumpiness ``(sum(I - I_box)_+ - N S_sky) / sum I`` over the N pixels at
    0.25 r_p <= r < 1.5 r_p, a centred :func:`boxcar` of width int(0.25 r_p) (Lotz et al. 2004,
    eq. 11; statmorph's width)."""
    width = int(PETRO_FRACTION_CAS * r_petro)
    if width < 2:
        return 0.0  # a box of one pixel smooths nothing: no residual, no background
    residual = np.clip(img - boxcar(img, width), 0, None)
    yy, xx = np.indices(img.shape)
    r = np.hypot(yy - cy, xx - cx)
    ann = (r >= PETRO_FRACTION_CAS * r_petro) & (r < PETRO_EXTENT * r_petro)
    total = img[ann].sum()
    if total <= 0:
        return math.nan
    return float((residual[ann].sum() - ann.sum() * sky_s) / total)


def colour(rgb: np.ndarray, mask: np.ndarray) -> float:
    """-2.5 log10(F_B / F_R) of the sky-subtracted channel fluxes within ``mask``."""
    fr, fb = (float((rgb[..., ch] - sky(rgb[..., ch])[0])[mask].sum()) for ch in (0, 2))
    if fr <= 0 or fb <= 0:
        return math.nan
    return float(-2.5 * math.log10(fb / fr))


# --------------------------------------------------------------------------- one image


def cas(img: np.ndarray, valid: np.ndarray, cy: float, cx: float, sky: np.ndarray,
        noise: float) -> dict[str, float]:
    """C, A, S, r50, the flux within 1.5 r_p and the asymmetry centre (ay, ax) of ``img`` (masked pixels 0, ``valid``
    False) about the centroid (cy, cx), in statmorph's order: r_p about the centroid sets the
    asymmetry aperture; r_p about the asymmetry centre sets everything else. With no ``sky``
    and ``noise`` 0, A and S come without background terms."""
    r_max = math.hypot(*img.shape)
    r_p0 = petrosian_radius(*apertures(img, valid, cy, cx), r_max)
    a, ay, ax = asymmetry(img, valid, cy, cx, PETRO_EXTENT * r_p0, sky, noise)
    flux, area = apertures(img, valid, ay, ax)
    r_p = petrosian_radius(flux, area, r_max)
    f_tot = abs(float(flux.flux(PETRO_EXTENT * r_p)))
    r20, r50, r80 = (flux.radius(q * f_tot) for q in (0.2, 0.5, 0.8))
    width = int(PETRO_FRACTION_CAS * r_p)
    return {
        "concentration": 5 * math.log10(r80 / r20) if r20 > 0 and r80 > 0 else math.nan,
        "asymmetry": a,
        "smoothness": smoothness(img, ay, ax, r_p, sky_smoothness(img, sky, noise, width)),
        "r_half": r50, "flux": f_tot, "ay": ay, "ax": ax,
    }


def _gini_m20(img: np.ndarray, valid: np.ndarray, f_obj: np.ndarray, cy: float, cx: float,
              ay: float, ax: float) -> dict[str, float]:
    """Gini and M20 over the Gini segment (ellipse from the object's moments about the
    asymmetry centre, annulus about the centroid, as statmorph)."""
    elongation, theta = shape(f_obj, ay, ax)
    if not math.isfinite(elongation):
        return {"gini": math.nan, "m20": math.nan}
    a_p = petrosian_radius(*apertures(img, valid, ay, ax, elongation, theta),
                           math.hypot(*img.shape) * elongation)
    seg = gini_segment(img, cy, cx, a_p, elongation, theta)
    if seg is None:
        return {"gini": math.nan, "m20": math.nan}
    return {"gini": gini(img[seg]), "m20": m20(img, seg)}


def measure(image: np.ndarray) -> dict[str, float]:
    """Every statistic in :data:`MEASURED` for one (S, S, 3) image (uint8 or float in [0, 1])."""
    rgb = as_float_rgb(image)
    lum = rgb.mean(-1)
    bg, noise = sky(lum)
    lum = lum - bg
    seg = segment(lum, noise)
    if seg is None:
        return {k: math.nan for k in MEASURED}
    obj, others = seg
    f_obj = np.where(obj, lum, 0.0)
    if f_obj.sum() <= 0 or obj.sum() < 4:
        return {k: math.nan for k in MEASURED}
    valid = ~others  # neighbours masked, the object's own faint wings kept
    img = np.where(valid, lum, 0.0)
    cy, cx = centroid(f_obj)
    c = cas(img, valid, cy, cx, blank_sky(lum) & ~obj & ~others, noise)
    return {
        "concentration": c["concentration"], "asymmetry": c["asymmetry"], "smoothness": c["smoothness"],
        **_gini_m20(img, valid, f_obj, cy, cx, c["ay"], c["ax"]),
        "r_half": c["r_half"], "ellipticity": ellipticity(lum, obj), "colour": colour(rgb, obj),
        "flux": c["flux"],
    }


# Fewer images than this are measured in this process: a handful is over before a pool has
# started and sent them out.
PARALLEL_MIN_IMAGES = 64


def measure_all(images: Iterable[np.ndarray], stats: Sequence[str] = STATS,
                workers: int | None = None) -> dict[str, np.ndarray]:
    """{statistic: (N,) float array, NaN where the measurement failed} for many images, for
    each of ``stats`` (names in :data:`MEASURED`).

    ``workers``: processes measuring in parallel (:func:`ray_galaxy.parallel.ordered_map`);
    None: every core this process may run on, from :data:`PARALLEL_MIN_IMAGES` images up;
    1: in this process (what a Ray actor holding one CPU asks for). The values are the same."""
    seq = images if isinstance(images, (np.ndarray, list, tuple)) else list(images)
    rows = ordered_map(measure, seq, workers, min_items=PARALLEL_MIN_IMAGES)
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in stats}
