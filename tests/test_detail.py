"""The residual detail model: fitting recovers a known noise model; drawing is reproducible."""

import numpy as np
import pytest
import torch

from ray_galaxy.generation import detail as D
from ray_galaxy.images import ring_index


def _blobs(n: int, s: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth galaxies on a sky of 0.3 (far from the clip at 0): (n, s, s, 3) floats."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:s, :s] - (s - 1) / 2
    out = []
    for _ in range(n):
        w = rng.uniform(2, 5)
        g = np.exp(-(xx ** 2 + yy ** 2) / (2 * w ** 2))
        out.append(0.3 + 0.5 * g[..., None] * np.array([1.0, 0.8, 0.6]))
    return np.stack(out)


def _model(s: int = 32, coef=(4e-4, 2e-3, 0.0)) -> dict:
    ring = ring_index(s, half=True)
    k = np.arange(ring.max() + 1, dtype=float)
    spectrum = np.where(k >= D.k_min(s), 1.0 / (1 + (k / 6.0) ** 2), 0.0)
    spectrum /= spectrum[ring].mean()  # unit variance per band
    mix = np.linalg.cholesky(np.array([[1.0, 0.6, 0.3], [0.6, 1.0, 0.6], [0.3, 0.6, 1.0]]))
    return {"variance_coef": np.array(coef), "mix": mix, "spectrum": spectrum}


def test_fit_recovers_the_model_that_drew_the_residuals():
    truth = _model()
    means = _blobs(400)
    mt = torch.from_numpy(means).permute(0, 3, 1, 2).float()
    x = D.add_detail(mt, truth, seed=1).permute(0, 2, 3, 1).double().numpy()
    fit = D.fit_detail(x, means)
    np.testing.assert_allclose(fit["variance_coef"][0], truth["variance_coef"][0], rtol=0.1)
    np.testing.assert_allclose(fit["variance_coef"][1], truth["variance_coef"][1], rtol=0.25)
    np.testing.assert_allclose(fit["mix"] @ fit["mix"].T, truth["mix"] @ truth["mix"].T, atol=0.05)
    band = slice(D.k_min(32), 16)
    np.testing.assert_allclose(fit["spectrum"][band], truth["spectrum"][band], rtol=0.15)
    assert np.all(fit["spectrum"][: D.k_min(32)] == 0)  # no shape-scale noise


def test_fit_of_white_noise_is_flat_and_uncorrelated_across_bands():
    rng = np.random.default_rng(0)
    means = _blobs(200)
    x = means + 0.02 * rng.standard_normal(means.shape)
    fit = D.fit_detail(x, means)
    np.testing.assert_allclose(fit["variance_coef"][0], 4e-4, rtol=0.05)
    assert fit["variance_coef"][1:].sum() < 1e-4  # no dependence on the galaxy's light
    np.testing.assert_allclose(fit["mix"] @ fit["mix"].T, np.eye(3), atol=0.03)
    np.testing.assert_allclose(fit["spectrum"][2:20], 1.0, rtol=0.1)


def test_residual_grows_with_the_galaxy_light():
    means = torch.from_numpy(_blobs(50)).permute(0, 3, 1, 2).float()
    x = D.add_detail(means, _model(coef=(1e-5, 5e-3, 0.0)), seed=0)
    r = (x - means).abs().mean(1)  # (B, S, S)
    centre, sky = r[:, 12:20, 12:20].mean(), r[:, :4, :4].mean()
    assert centre > 3 * sky


def test_draws_are_seeded_clipped_and_independent_of_batch_size():
    means = torch.from_numpy(_blobs(8)).permute(0, 3, 1, 2).float()
    m = _model(coef=(0.05, 0.0, 0.0))  # large enough to hit the [0, 1] clip
    a, b = D.add_detail(means, m, seed=5), D.add_detail(means, m, seed=5)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, D.add_detail(means, m, seed=6))
    torch.testing.assert_close(D.add_detail(means[:3], m, seed=5), a[:3])
    torch.testing.assert_close(D.add_detail(means[3:], m, seed=5, offset=3), a[3:])  # a chunk of a request
    assert a.min() >= 0 and a.max() <= 1 and a.shape == means.shape and a.dtype == torch.float32


def test_size_mismatch_and_bad_shapes_are_clear_errors():
    means = torch.from_numpy(_blobs(2, s=64)).permute(0, 3, 1, 2).float()
    with pytest.raises(ValueError, match="another image size"):
        D.add_detail(means, _model(s=32))
    with pytest.raises(ValueError, match=r"\(N, S, S, 3\)"):
        D.fit_detail(_blobs(3), _blobs(3)[..., :2])


def test_calibrated_gain_recovers_the_amplitude_of_the_real_residual():
    m = _model()
    means = _blobs(300)
    mt = torch.from_numpy(means).permute(0, 3, 1, 2).float()
    real = D.add_detail(mt, m, seed=1, temperature=1.5).permute(0, 2, 3, 1).double().numpy()
    cal = D.calibrate_gain(means, m, real, seed=2)  # another noise draw than the real images'
    assert cal["gain"] == pytest.approx(1.5, rel=0.05)
    assert cal["deficit_dex_at_1"] < -0.1 and abs(cal["deficit_dex"]) < 0.01


def test_calibrated_gain_is_clamped_where_the_residual_model_is_wrong():
    m = _model()
    means = _blobs(100)
    assert D.calibrate_gain(means, m, means)["gain"] == D.GAIN_BOUNDS[0]  # real images have no residual
    mt = torch.from_numpy(means).permute(0, 3, 1, 2).float()
    loud = D.add_detail(mt, m, seed=1, temperature=5.0).permute(0, 2, 3, 1).double().numpy()
    assert D.calibrate_gain(means, m, loud)["gain"] == D.GAIN_BOUNDS[1]
    with pytest.raises(ValueError, match="one size"):
        D.calibrate_gain(means, m, _blobs(4, s=16))


def test_flat_means_fit_a_constant_variance_instead_of_failing():
    # A barely trained decoder (2 epochs on 96 images) draws one flat image: every luminance
    # quantile is equal. The fit then has only sky noise to describe, and says so in its terms.
    rng = np.random.default_rng(0)
    means = np.full((12, 32, 32, 3), 0.2)
    images = np.clip(means + rng.normal(0, 0.05, means.shape), 0, 1)
    d = D.fit_detail(images, means)
    c0, c1, c2 = d["variance_coef"]
    assert c0 == pytest.approx(0.05 ** 2, rel=0.1) and c1 == c2 == 0.0
    x = D.add_detail(torch.from_numpy(means).permute(0, 3, 1, 2).float(), d, seed=0)
    assert torch.isfinite(x).all() and float((x - 0.2).std()) > 0.01


def test_sky_kind_draws_the_skys_noise_alone_at_its_own_amplitude():
    # Real images: smooth galaxies plus a residual that is 4x larger on the galaxy than on the sky.
    rng = np.random.default_rng(1)
    means = _blobs(40)
    lum = D.brightness(means)[..., None]
    images = np.clip(means + rng.normal(0, 1, means.shape) * (0.01 + 0.2 * lum), 0, 1)
    galaxy, sky = D.fit_detail(images, means), D.fit_detail(images, means, kind="sky")
    assert galaxy["variance_coef"][1:].sum() > 0 and sky["variance_coef"][1:].sum() == 0
    assert sky["variance_coef"][0] == pytest.approx(0.01 ** 2, rel=0.2)
    # Drawn: as much noise on the galaxy as on the sky, and that the sky's (white noise spectrum
    # kept from k_min up, so a little less than the whole variance)
    m = torch.from_numpy(means).permute(0, 3, 1, 2).float()
    r = D.add_detail(m, sky, seed=0) - m
    centre, edge = float(r[:, :, 12:20, 12:20].std()), float(r[:, :, :6, :6].std())
    assert centre == pytest.approx(edge, rel=0.1) and 0.007 < edge < 0.011
    with pytest.raises(ValueError, match="detail kind"):
        D.fit_detail(images, means, kind="stars")


def test_the_differentiable_draw_matches_the_sampling_draw_and_passes_gradients():
    # The fine-tuning critic judges images drawn with draw_differentiable; users get add_detail's.
    m = torch.from_numpy(_blobs(60)).permute(0, 3, 1, 2).float().requires_grad_(True)
    d = {k: torch.as_tensor(v) for k, v in _model(coef=(4e-4, 5e-3, 0.0)).items()}
    x = D.draw_differentiable(m, d, torch.Generator().manual_seed(0))
    x.sum().backward()
    assert m.grad is not None and float(m.grad.abs().sum()) > 0 and 0 <= float(x.detach().min()) <= float(x.detach().max()) <= 1
    y = D.add_detail(m.detach(), d, seed=0)
    for region in (np.s_[..., 12:20, 12:20], np.s_[..., :6, :6]):  # galaxy and sky alike
        got, want = float((x.detach() - m.detach())[region].std()), float((y - m.detach())[region].std())
        assert got == pytest.approx(want, rel=0.05)
