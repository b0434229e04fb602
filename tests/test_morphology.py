"""Morphology statistics (evaluation) and power spectra (images) on synthetic galaxies with known answers."""

import math

import numpy as np
import pytest
from scipy import ndimage

from ray_galaxy import images as I
from ray_galaxy import morphology as M
from ray_galaxy.evaluation import sharpness as SH
from ray_galaxy.evaluation.distances import wasserstein_table

S = 64
C = (S - 1) / 2


def profile(kind: str = "gauss", scale: float = 4.0, q: float = 1.0, theta: float = 0.3,
            centre: tuple[float, float] = (C, C), amp: float = 0.8, sky: float = 0.05) -> np.ndarray:
    """A noiseless grey galaxy: Gaussian, exponential disk or de Vaucouleurs, axis ratio q."""
    y, x = np.mgrid[:S, :S].astype(float)
    y, x = y - centre[0], x - centre[1]
    u = x * np.cos(theta) + y * np.sin(theta)
    v = -x * np.sin(theta) + y * np.cos(theta)
    r = np.sqrt(u ** 2 + (v / q) ** 2)
    if kind == "gauss":
        img = np.exp(-r ** 2 / (2 * scale ** 2))
    elif kind == "exp":
        img = np.exp(-r / scale)
    elif kind == "dev":  # Sersic n=4 with effective radius `scale`
        img = np.exp(-7.669 * ((r / scale) ** 0.25 - 1))
        img = img / img.max()
    else:
        raise ValueError(kind)
    return sky + amp * img


def rgb(lum: np.ndarray, colour=(1.0, 1.0, 1.0), noise: float = 0.0, seed: int = 0) -> np.ndarray:
    out = lum[..., None] * np.asarray(colour) + np.random.default_rng(seed).normal(0, noise, (S, S, 3))
    return np.clip(out, 0, 1)


GAUSS_C = 5 * math.log10(math.sqrt(math.log(5) / math.log(1.25)))  # 2.145
EXP_C = 2.70  # exponential disk, e.g. Bershady et al. 2000


def test_round_gaussian_is_round_symmetric_with_the_analytic_concentration():
    m = M.measure(rgb(profile("gauss", 4.0)))
    assert m["ellipticity"] < 0.01
    assert abs(m["asymmetry"]) < 0.01
    assert m["concentration"] == pytest.approx(GAUSS_C, abs=0.05)
    assert m["r_half"] == pytest.approx(4.0 * math.sqrt(2 * math.log(2)), rel=0.03)  # 1.177 sigma


def test_flux_is_the_light_above_the_sky():
    """A Gaussian of peak 0.8 and sigma 4 px holds 0.8 * 2 pi sigma^2 above the sky; at half the
    peak, half of it (the sky level is subtracted, not counted)."""
    full = M.measure(rgb(profile("gauss", 4.0)))["flux"]
    assert full == pytest.approx(0.8 * 2 * math.pi * 16, rel=0.02)
    assert M.measure(rgb(profile("gauss", 4.0, amp=0.4)))["flux"] == pytest.approx(full / 2, rel=0.02)


@pytest.mark.parametrize("q", [0.5, 0.3])
@pytest.mark.parametrize("theta", [0.0, 0.7])
def test_elongated_blob_has_the_constructed_ellipticity(q, theta):
    m = M.measure(rgb(profile("gauss", 6.0, q=q, theta=theta)))
    assert m["ellipticity"] == pytest.approx(1 - q, abs=0.03)
    assert abs(m["asymmetry"]) < 0.03  # still point-symmetric


def test_concentration_known_values_and_ordering():
    c_gauss = M.measure(rgb(profile("gauss", 4.0)))["concentration"]
    c_exp = M.measure(rgb(profile("exp", 3.0)))["concentration"]
    c_dev = M.measure(rgb(profile("dev", 6.0)))["concentration"]
    assert c_exp == pytest.approx(EXP_C, abs=0.1)
    assert c_gauss < c_exp < c_dev
    assert c_dev > 3.3


def test_point_source_makes_a_galaxy_more_concentrated():
    # An exponential disk, and the same disk with an unresolved nucleus (PSF sigma 1 px)
    # holding about a fifth of the light. (A bare point source is not "more concentrated" in
    # C = 5 log10(r80/r20): that ratio is scale-free, and for a Gaussian PSF it is 2.14.)
    disk = profile("exp", 5.0, amp=0.1)
    nucleated = disk + 0.9 * np.exp(-((np.mgrid[:S, :S] - C) ** 2).sum(0) / (2 * 1.0 ** 2))
    c_disk = M.measure(rgb(disk))["concentration"]
    c_nuc = M.measure(rgb(nucleated))["concentration"]
    assert c_nuc > c_disk + 0.5
    # M20 and Gini agree: the light sits in a few central pixels.
    assert M.measure(rgb(nucleated))["m20"] < M.measure(rgb(disk))["m20"]
    assert M.measure(rgb(nucleated))["gini"] > M.measure(rgb(disk))["gini"]


def test_asymmetry_of_an_off_centre_clump_and_subpixel_centres():
    base = profile("exp", 4.0)
    clumpy = base + 0.5 * np.exp(-((np.mgrid[:S, :S] - np.array([C + 6, C - 4])[:, None, None]) ** 2).sum(0) / 4)
    assert M.measure(rgb(clumpy))["asymmetry"] > 0.1
    # A symmetric galaxy centred between pixels is still found symmetric (half-pixel centre grid).
    shifted = profile("exp", 4.0, centre=(C + 0.5, C - 1.0))
    assert abs(M.measure(rgb(shifted))["asymmetry"]) < 0.01


def test_noise_is_corrected_for_in_asymmetry_and_smoothness():
    noisy = M.measure(rgb(profile("exp", 4.0), noise=0.02, seed=1))
    assert abs(noisy["asymmetry"]) < 0.05
    assert abs(noisy["smoothness"]) < 0.05
    assert noisy["ellipticity"] < 0.05


def test_smoothness_rises_with_clumps():
    disk = profile("exp", 5.0)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:S, :S]
    clumps = disk.copy()
    for _ in range(12):
        r, a = rng.uniform(4, 12), rng.uniform(0, 2 * np.pi)
        clumps += 0.15 * np.exp(-((yy - C - r * np.sin(a)) ** 2 + (xx - C - r * np.cos(a)) ** 2) / (2 * 0.8 ** 2))
    s_disk, s_clumps = M.measure(rgb(disk))["smoothness"], M.measure(rgb(clumps))["smoothness"]
    assert abs(s_disk) < 0.02
    # r_p ~ 11 px here, so the boxcar is int(0.25 r_p) = 2 px wide: it keeps part of these
    # sigma-0.8-px clumps in the smoothed copy (hence a rise of ~0.03, not more).
    assert s_clumps > s_disk + 0.02


def test_gini_extremes():
    assert M.gini(np.ones(100)) == pytest.approx(0.0, abs=1e-12)
    one = np.zeros(100)
    one[17] = 5.0
    assert M.gini(one) == pytest.approx(1.0)
    assert 0 < M.gini(np.arange(100.0)) < 1


def test_m20_orders_nucleus_below_merger():
    yy, xx = np.mgrid[:S, :S]

    def blob(cy, cx, s=2.5):
        return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s ** 2))

    # Off the pixel grid: a blob centred on it has rings of 4-8 equal pixels, and statmorph's rule
    # (every pixel at least as bright as the one crossing 20 % of the flux) takes a whole ring.
    single = 0.05 + 0.8 * blob(C + 0.3, C - 0.2)
    merger = 0.05 + 0.8 * blob(C, C - 7) + 0.8 * blob(C, C + 7) + 0.2 * blob(C, C, 6)
    mask = np.ones((S, S), bool)
    assert M.m20(single - 0.05, mask) < -1.5
    assert M.m20(merger - 0.05, mask) > M.m20(single - 0.05, mask) + 0.5
    assert M.measure(rgb(merger))["m20"] > M.measure(rgb(single))["m20"]


def test_m20_of_a_gaussian_is_the_analytic_value():
    # Brightest 20 % of a 2-D Gaussian: r^2 < 2 s^2 ln 1.25, holding 1 - 0.8 (1 + ln 1.25) of M_tot.
    yy, xx = np.mgrid[:S, :S]
    g = np.exp(-((yy - C - 0.3) ** 2 + (xx - C + 0.2) ** 2) / (2 * 4.0 ** 2))
    expected = math.log10(1 - 0.8 * (1 + math.log(1.25)))  # -1.665
    assert M.m20(g, np.ones((S, S), bool)) == pytest.approx(expected, abs=0.05)


def test_boxcar_is_centred_for_even_widths():
    ramp = np.tile(np.arange(S, dtype=float), (S, 1))
    for width in (2, 3, 4, 6):
        assert np.allclose(M.boxcar(ramp, width)[:, 8:-8], ramp[:, 8:-8])
    # scipy's even uniform_filter (statmorph's) is shifted by half a pixel.
    assert np.allclose(ndimage.uniform_filter(ramp, 4)[:, 8:-8], ramp[:, 8:-8] - 0.5)


def test_noise_free_smooth_profiles_have_no_asymmetry_or_smoothness():
    # The galaxy's own wings run across the sky tiles: they must not count as sky noise.
    for h in (3.0, 4.0, 6.0):
        m = M.measure(rgb(profile("exp", h, centre=(C + 0.5, C - 1.0))))
        assert abs(m["asymmetry"]) < 0.005 and abs(m["smoothness"]) < 0.005


def test_correlated_noise_is_corrected_for():
    # Resampled JPEGs have pixel noise correlated over ~1 px (GZ2 crops at 64 px: rho(1) ~ 0.6);
    # the sky terms are measured on the sky, not modelled as white noise.
    a, s = [], []
    for seed in range(6):
        noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(S, S)), 0.8)
        m = M.measure(rgb(profile("exp", 5.0) + 0.015 * noise / noise.std()))
        a.append(m["asymmetry"])
        s.append(m["smoothness"])
    assert max(map(abs, a)) < 0.05 and abs(np.mean(a)) < 0.02
    assert abs(np.mean(s)) < 0.012


def test_elliptical_petrosian_radius_is_the_round_one_along_the_major_axis():
    q, theta = 0.5, 0.6
    lum = profile("exp", 4.0, q=q, theta=theta, sky=0.0)
    valid = np.ones((S, S), bool)
    a_p = M.petrosian_radius(*M.apertures(lum, valid, C, C, 1 / q, theta), 90.0)
    r_p = M.petrosian_radius(*M.apertures(profile("exp", 4.0, sky=0.0), valid, C, C), 90.0)
    assert a_p == pytest.approx(r_p, rel=0.03)
    # Exponential disk, eta = 0.2: x^2 e^-x / (2 (1 - e^-x (1 + x))) = 0.2 at x = r_p / h = 3.622.
    assert r_p == pytest.approx(3.622 * 4.0, rel=0.02)


def test_colour_index_of_red_and_blue_galaxies():
    lum = profile("gauss", 4.0, sky=0.0)
    red = M.measure(rgb(lum, colour=(1.0, 0.7, 0.5)))["colour"]
    blue = M.measure(rgb(lum, colour=(0.5, 0.7, 1.0)))["colour"]
    assert red == pytest.approx(-2.5 * math.log10(0.5), abs=0.01)  # +0.753: redder is larger
    assert blue == pytest.approx(-2.5 * math.log10(2.0), abs=0.01)


def test_empty_image_gives_nan_everywhere():
    m = M.measure(np.zeros((S, S, 3), np.uint8))
    assert set(m) == set(M.MEASURED)
    assert all(math.isnan(v) for v in m.values())


def test_uint8_and_float_inputs_agree():
    img = rgb(profile("exp", 4.0))
    a = M.measure((img * 255).round().astype(np.uint8))
    b = M.measure(np.round(img * 255) / 255)
    assert a == pytest.approx(b)


def test_wasserstein_zero_for_identical_sets_and_one_sd_for_a_shift():
    rng = np.random.default_rng(0)
    real = {k: rng.normal(size=400) for k in M.STATS}
    same = wasserstein_table(real, {k: v.copy() for k, v in real.items()})
    assert all(v["distance"] == 0 for v in same.values())
    assert all(0 < v["floor"] < 0.3 for v in same.values())
    shifted = wasserstein_table(real, {k: v + np.std(v) for k, v in real.items()})
    assert all(v["distance"] == pytest.approx(1.0) for v in shifted.values())
    with_nan = {k: np.r_[v, np.nan] for k, v in real.items()}
    assert wasserstein_table(real, with_nan)["gini"]["distance"] == 0  # failures are dropped


def test_power_deficit_zero_for_identical_and_negative_for_blurred():
    rng = np.random.default_rng(0)
    imgs = []
    for i in range(8):
        lum = profile("exp", rng.uniform(3, 6), q=rng.uniform(0.4, 1), theta=rng.uniform(0, 3))
        imgs.append(lum + 0.05 * ndimage.gaussian_filter(rng.normal(size=(S, S)), 1.0))
    imgs = np.stack(imgs)
    k, p = I.radial_power_spectrum(imgs)
    assert k[0] == 1 and k[-1] == S // 2 and np.all(p > 0)
    assert I.power_deficit_dex(k, p, p, S) == 0
    blurred = np.stack([ndimage.gaussian_filter(a, 1.5) for a in imgs])
    _, pb = I.radial_power_spectrum(blurred)
    assert I.power_deficit_dex(k, pb, p, S) < -0.3
    assert I.structure_band(S) == (4, 16)


def test_power_spectrum_parseval():
    """Sum of the (sky-free) power over all frequencies equals the mean square of the image."""
    a = np.random.default_rng(1).normal(size=(S, S))
    a -= np.median(I.border(a))
    p = np.abs(np.fft.fft2(a)) ** 2 / S ** 4
    assert p.sum() == pytest.approx((a ** 2).mean())


# --------------------------------------------------------------------------- high-pass sharpness


def clumpy_disk(sky: float = 0.2) -> np.ndarray:
    """An exponential disk with 12 sharp (sigma 0.8 px) clumps on a sky high enough that added
    noise is never clipped at 0."""
    disk = profile("exp", 5.0, sky=sky)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:S, :S]
    for _ in range(12):
        r, a = rng.uniform(3, 12), rng.uniform(0, 2 * np.pi)
        disk = disk + 0.15 * np.exp(-((yy - C - r * np.sin(a)) ** 2 + (xx - C - r * np.cos(a)) ** 2) / (2 * 0.8 ** 2))
    return disk


def grey(lum: np.ndarray, noise: float = 0.0, where: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """(S, S, 3) floats: ``lum`` plus white noise per channel (only on ``where`` if given)."""
    n = np.random.default_rng(seed).normal(0, noise, (S, S, 3))
    return lum[..., None] + (n if where is None else np.where(where[..., None], n, 0.0))


def test_white_noise_gain_is_the_variance_of_high_passed_white_noise():
    n = np.random.default_rng(0).normal(size=(256, 256))
    assert SH.white_noise_gain() == pytest.approx(1 - 3 / (4 * math.pi), rel=1e-3)  # wide-kernel limit
    assert np.var(SH.highpass(n)) == pytest.approx(SH.white_noise_gain(), rel=0.02)


def test_highpass_sharpness_cannot_be_faked_by_noise():
    sharp, blurred = clumpy_disk(), ndimage.gaussian_filter(clumpy_disk(), 1.5)
    s, b = SH.measure(grey(sharp)), SH.measure(grey(blurred))
    assert s > 3 * b > 0
    gap = s - b
    # White noise on galaxy and sky (luminance sigma 0.017, peak S/N ~ 50): uncorrected, the
    # segment's high-pass power would exceed the sharp galaxy's; corrected, it stays within
    # 20 % of the gap of the blurred value (4 noise draws).
    noisy = [SH.measure(grey(blurred, 0.03, seed=k)) for k in range(4)]
    assert abs(np.mean(noisy) - b) < 0.2 * gap
    lum = grey(blurred, 0.03).mean(-1)
    lum = lum - M.sky(lum)[0]
    obj = M.segment(lum, M.noise_sigma(lum))[0]
    assert np.mean(SH.highpass(lum)[obj] ** 2) / lum[obj].mean() ** 2 > s  # what noise would fake
    # Noise on the sky only: the segment's own power is unchanged, and the correction (which
    # assumes the sky's noise is on the galaxy too) over-subtracts by only sigma^2 gain / flux^2,
    # under 10 % of the gap at this S/N (luminance sigma 0.003).
    outside = ~M.segment(blurred - 0.2, 1e-3)[0]
    sky_only = [SH.measure(grey(blurred, 0.005, outside, seed=k)) for k in range(4)]
    assert abs(np.mean(sky_only) - b) < 0.1 * gap


def test_highpass_sharpness_ignores_brightness_and_fails_like_morphology():
    g = clumpy_disk(sky=0.05)
    assert SH.measure(grey(g)) == pytest.approx(SH.measure(grey(0.5 * g)), rel=1e-6)
    assert math.isnan(SH.measure(np.zeros((S, S, 3))))
    v = SH.measure_all([grey(g), np.zeros((S, S, 3))])
    assert np.isfinite(v[0]) and math.isnan(v[1])
