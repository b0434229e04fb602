"""The generation layer: D4, slerp, the mixture sampler (fit, kernels, staleness) and the Generator."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from conftest import REPO
from synthetic import galaxy
from tiny_model import SIZE, copy_fixture, tiny_fixture  # noqa: F401 (the tiny and copy fixtures)

from ray_galaxy import figures
from ray_galaxy.checkpoint import load_model_dir
from ray_galaxy.generation import detail as D
from ray_galaxy.generation.fit import fit_sampler
from ray_galaxy.generation.generator import Generator
from ray_galaxy.generation.latents import SEED_BLOCK, prior_latents, slerp
from ray_galaxy.generation.sampler import (KERNEL_BANDWIDTH, SAMPLER_FILE, MixtureSampler, SamplerError,
                                           encode_means, fit_mixture)
from ray_galaxy.images import D4, augment_d4, orient, orient_tensor


# --------------------------------------------------------------------------- D4 and slerp


def test_orient_and_orient_tensor_are_the_same_map_and_augment_draws_its_elements():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    seen = set()
    for o in range(len(D4)):
        np.testing.assert_array_equal(orient_tensor(x, o).permute(0, 2, 3, 1).numpy(), orient(imgs, o))
        seen.add(orient(imgs, o)[0].tobytes())
    assert len(seen) == 8  # eight different images: the elements are distinct
    y = augment_d4(x, torch.Generator().manual_seed(1)).permute(0, 2, 3, 1).numpy()
    for i in range(len(imgs)):
        assert any(np.array_equal(y[i], orient(imgs[i:i + 1], o)[0]) for o in range(8))
    again = augment_d4(x, torch.Generator().manual_seed(1)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(y, again)


def test_slerp_endpoints_and_norm():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    p = slerp(a, b, 5)
    torch.testing.assert_close(p[0], a)
    torch.testing.assert_close(p[-1], b)
    torch.testing.assert_close(p.norm(dim=1), torch.full((5,), 3.0))
    q = slerp(a, 2 * b, 9).norm(dim=1)  # unequal norms: from one to the other, never through the origin
    assert torch.all(q[1:] >= q[:-1]) and q[0] == pytest.approx(3.0) and q[-1] == pytest.approx(6.0)


def test_slerp_of_opposite_codes_is_finite_and_reaches_both_ends():
    a = torch.tensor([1.0, -2.0, 0.5])
    p = slerp(a, -a, 7)
    assert p.shape == (7, 3) and torch.isfinite(p).all()
    torch.testing.assert_close(p[0], a)
    torch.testing.assert_close(p[-1], -a)
    z = slerp(torch.zeros(3), a, 4)  # a zero code: the straight line
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[-1], a)


# --------------------------------------------------------------------------- the mixture sampler


def test_mixture_recovers_two_well_separated_clusters():
    rng = np.random.default_rng(0)
    a = rng.normal([-5, 0, 2], [1.0, 0.5, 0.3], size=(300, 3))
    b = rng.normal([5, 1, -2], [0.5, 1.0, 0.3], size=(100, 3))
    x = np.concatenate([a, b])
    for cov in ("full", "diag"):
        g = fit_mixture(x, components=2, covariance=cov, seed=0)
        order = np.argsort(g["means"][:, 0])
        assert g["converged"]
        np.testing.assert_allclose(g["means"][order], [[-5, 0, 2], [5, 1, -2]], atol=0.2)
        np.testing.assert_allclose(g["weights"][order], [0.75, 0.25], atol=0.01)
        np.testing.assert_allclose(np.sqrt(np.diagonal(g["covariances"][order[0]])), [1.0, 0.5, 0.3], rtol=0.15)
        assert g["covariances"].shape == (2, 3, 3)
    np.testing.assert_array_equal(fit_mixture(x, components=2, seed=0)["means"],
                                  fit_mixture(x, components=2, seed=0)["means"])  # seeded


def test_sampler_mixture_is_fitted_to_the_codes_of_all_eight_orientations(copy):
    md = load_model_dir(copy)
    rng = np.random.default_rng(5)
    # lopsided galaxies, so the eight orientations have different codes
    imgs = np.stack([np.roll(galaxy(SIZE, rng, sigma=3.0), (4, 7), axis=(0, 1)) for _ in range(12)])
    meta = fit_sampler(copy, images=imgs, components=2, detail=False)
    assert meta["orientations"] == 8 and meta["codes"] == 8 * 12 and meta["train_images"] == 12
    mixture_mean = Generator.load(copy).sampler.mean_code().double().numpy()  # = the mean code EM saw
    all8 = np.concatenate([encode_means(md.model, orient(imgs, o)) for o in range(8)])
    np.testing.assert_allclose(mixture_mean, all8.mean(0), atol=1e-5)
    assert np.abs(mixture_mean - encode_means(md.model, imgs).mean(0)).max() > 1e-3
    assert fit_sampler(copy, images=imgs, components=2, detail=False, orientations=1)["codes"] == 12
    with pytest.raises(ValueError, match="orientations"):
        fit_sampler(copy, images=imgs, orientations=9)


def test_kernel_draws_sit_on_the_codes_with_their_components_shape():
    """Kernels on the codes: a code plus N(0, (b T)^2 Sigma_k) noise, k the code's component."""
    cov = np.stack([np.diag([4.0, 0.25]), np.array([[1.0, 0.9], [0.9, 1.0]])])
    codes = np.array([[10.0, 0.0], [-10.0, 5.0], [0.0, -20.0]])
    tensors = {"weights": torch.tensor([0.5, 0.5], dtype=torch.float64),
               "means": torch.zeros(2, 2, dtype=torch.float64), "covariances": torch.from_numpy(cov),
               "kernel_codes": torch.from_numpy(codes).float(), "kernel_component": torch.tensor([0, 1, 1]),
               "kernel_bandwidth": torch.tensor(0.5, dtype=torch.float64)}
    sampler = MixtureSampler(tensors, {})
    for temperature in (1.0, 2.0):
        z = sampler.latents(30000, seed=4, temperature=temperature).double().numpy()
        pick = np.argmin(((z[:, None] - codes[None]) ** 2).sum(-1), 1)  # kernels far apart: unambiguous
        assert np.abs(np.bincount(pick, minlength=3) / len(z) - 1 / 3).max() < 0.02  # codes equally likely
        for i, k in enumerate([0, 1, 1]):
            dev = z[pick == i] - codes[i]
            np.testing.assert_allclose(dev.mean(0), 0, atol=0.05 * temperature)
            np.testing.assert_allclose(np.cov(dev.T), (0.5 * temperature) ** 2 * cov[k], atol=0.04 * temperature ** 2)
    torch.testing.assert_close(sampler.latents(7, seed=1), sampler.latents(7, seed=1))
    assert not torch.equal(sampler.latents(7, seed=1), sampler.latents(7, seed=2))
    plain = MixtureSampler({k: v for k, v in tensors.items() if not k.startswith("kernel_")}, {})
    assert np.abs(plain.latents(2000, seed=4).numpy()).max() < 10  # the components: around 0


def _owners(codes: np.ndarray, t: dict) -> np.ndarray:
    """The most responsible component of each code: argmax_k log(w_k N(x; mu_k, Sigma_k))."""
    w, mu, cov = (t[k].double().numpy() for k in ("weights", "means", "covariances"))
    logp = np.stack([np.log(w[k]) + multivariate_normal(mu[k], cov[k]).logpdf(codes) for k in range(len(w))], 1)
    return logp.argmax(1)


def test_sampler_kernels_follow_the_fitted_components(copy):
    md = load_model_dir(copy)
    rng = np.random.default_rng(2)
    imgs = np.stack([galaxy(SIZE, rng) for _ in range(16)])
    meta = fit_sampler(copy, images=imgs, components=2, detail=False, bandwidth=0.2)
    t = Generator.load(copy).sampler.tensors
    codes = np.concatenate([encode_means(md.model, orient(imgs, o)) for o in range(8)])
    np.testing.assert_allclose(t["kernel_codes"].numpy(), codes, atol=1e-6)
    np.testing.assert_array_equal(t["kernel_component"].numpy(), _owners(codes, t))
    assert meta["kernels"] == "codes" and meta["bandwidth"] == 0.2
    # a tiny bandwidth draws the training codes themselves
    fit_sampler(copy, images=imgs, components=2, detail=False, bandwidth=1e-9)
    z = Generator.load(copy).latents(40, seed=0, sampler="gmm").double().numpy()
    assert np.sqrt(((z[:, None] - codes[None]) ** 2).sum(-1)).min(1).max() < 1e-5
    # bandwidth 0: the mixture's components, as before kernels existed
    plain = fit_sampler(copy, images=imgs, components=2, detail=False, bandwidth=0)
    gen = Generator.load(copy)
    assert plain["kernels"] == "components" and not any(k.startswith("kernel_") for k in gen.sampler.tensors)
    z0 = gen.latents(40, seed=0, sampler="gmm").double().numpy()
    assert np.sqrt(((z0[:, None] - codes[None]) ** 2).sum(-1)).min(1).min() > 1e-4
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="bandwidth"):
            fit_sampler(copy, images=imgs, components=2, detail=False, bandwidth=bad)


def test_sampler_missing_fitted_reproducible_and_stale(tiny, copy):
    gen = Generator.load(copy)
    torch.testing.assert_close(gen.latents(5, seed=3), prior_latents(gen.model_config.latent_dim, 5, seed=3))  # auto: the prior
    with pytest.raises(SamplerError, match="fit_sampler.py"):
        gen.latents(5, sampler="gmm")
    meta = fit_sampler(copy, components=3, seed=0)  # default training data: config.json train.data
    assert meta["components"] == 3 and meta["train_data"] == str(tiny["train"])
    assert meta["train_images"] < 48  # the training split only, not the images held out by hash
    raw = torch.load(f"{copy}/{SAMPLER_FILE}", weights_only=True)
    assert set(raw) == {"weights", "means", "covariances", "detail_variance_coef", "detail_mix", "detail_spectrum",
                        "kernel_codes", "kernel_component", "kernel_bandwidth", "image_properties"}
    assert raw["image_properties"].shape == (meta["train_images"], len(meta["properties"]))
    assert meta["kernels"] == "codes" and meta["bandwidth"] == KERNEL_BANDWIDTH
    assert raw["kernel_codes"].shape == (meta["codes"], 4) and float(raw["kernel_bandwidth"]) == KERNEL_BANDWIDTH
    d = meta["detail"]  # the gain brings the samples' structure-band power to the training images'
    assert d["k_min"] == 2  # 32 px: S/16
    assert D.GAIN_BOUNDS[0] <= d["gain"] <= D.GAIN_BOUNDS[1]
    assert abs(d["power_deficit_dex"]) <= abs(d["power_deficit_dex_at_gain_1"]) + 1e-9
    gen = Generator.load(copy)
    means = gen.generate(6, seed=2, sampler="gmm", detail=False)
    drawn = gen.generate(6, seed=2, sampler="gmm")
    torch.testing.assert_close(drawn, Generator.load(copy).generate(6, seed=2, sampler="gmm"))  # by seed
    assert (drawn - means).abs().mean() > 1e-3 and drawn.min() >= 0 and drawn.max() <= 1
    torch.testing.assert_close(gen.generate(2, seed=2, sampler="gmm"), drawn[:2])  # galaxy i is i
    torch.testing.assert_close(gen.generate(6, seed=2), drawn)  # 'auto' picks the sampler
    # traversal around the sampler's codes: the two dims the training codes vary most along
    img, dims = figures.traversal_figure(gen, steps=4)
    assert dims == tuple(int(i) for i in np.argsort(-gen.sampler.variance())[:2])
    assert img.shape[0] == img.shape[1] and img.dtype == np.uint8
    z1 = gen.latents(50, seed=1, sampler="gmm")
    torch.testing.assert_close(z1, Generator.load(copy).latents(50, seed=1, sampler="gmm"))
    assert z1.shape == (50, 4) and torch.isfinite(z1).all()
    sd = {k: v + 0.01 for k, v in gen.model.state_dict().items()}  # "retrain": model.pt changes
    torch.save(sd, f"{copy}/model.pt")
    stale = Generator.load(copy)
    assert stale.sampler is None and "different model.pt" in stale.sampler_problem
    assert stale.resolve("auto") == "prior"
    with pytest.raises(SamplerError, match="different model.pt"):
        stale.latents(5, sampler="gmm")


# --------------------------------------------------------------------------- the Generator


def test_generator_gives_the_same_bytes_whole_or_in_chunks(models):
    gen = Generator.load(models.a)
    assert gen.detail is not None  # model a's sampler has a residual detail model
    z = gen.latents(7, seed=11, sampler="gmm")
    seed = gen.detail_seed("gmm", True, 11)
    whole = gen.decode_uint8(z, seed)
    chunks = np.concatenate([gen.decode_uint8(z[:3], seed, offset=0), gen.decode_uint8(z[3:], seed, offset=3)])
    np.testing.assert_array_equal(chunks, whole)
    np.testing.assert_array_equal(gen.images(7, 11, "gmm"), whole)
    assert not np.array_equal(gen.decode_uint8(z, None), whole)  # the detail is really there
    np.testing.assert_array_equal(gen.images(3, 11, "gmm"), whole[:3])  # galaxy i whatever n
    np.testing.assert_array_equal(gen.images(2, 11, "prior"), gen.images(7, 11, "prior")[:2])
    np.testing.assert_array_equal(gen.images(4, 11, "gmm", start=3), whole[3:])  # and wherever it starts


def test_galaxy_i_depends_only_on_seed_and_i_across_seed_blocks(models):
    """Galaxy i of a seed is the same in any request that contains it, also past a block."""
    gen = Generator.load(models.a)
    n = SEED_BLOCK + 5
    for sampler in ("prior", "gmm"):
        z = gen.latents(n, seed=3, sampler=sampler)
        torch.testing.assert_close(gen.latents(9, seed=3, sampler=sampler, start=SEED_BLOCK - 4), z[SEED_BLOCK - 4:])
        torch.testing.assert_close(gen.latents(5, seed=4, sampler=sampler), z[SEED_BLOCK:])  # next block
    whole = gen.images(n, 3, "gmm")
    across = np.concatenate([gen.images(SEED_BLOCK - 2, 3, "gmm"), gen.images(7, 3, "gmm", start=SEED_BLOCK - 2)])
    np.testing.assert_array_equal(across, whole)


def test_ingress_codes_without_weights_equal_the_full_generators(models):
    full, codes_only = Generator.load(models.a), Generator.load(models.a, weights=False)
    assert codes_only.version == full.version and codes_only.samplers == ["prior", "gmm"]
    for sampler in ("auto", "prior", "gmm"):
        torch.testing.assert_close(codes_only.latents(9, 4, sampler, 0.8), full.latents(9, 4, sampler, 0.8))
    with pytest.raises(RuntimeError, match="without weights"):
        codes_only.model


def test_a_model_without_sampler_uses_the_prior_and_refuses_gmm_clearly(models):
    gen = Generator.load(models.b)
    assert gen.sampler is None and gen.samplers == ["prior"] and gen.resolve("auto") == "prior"
    assert gen.detail_seed("auto", True, 3) is None  # the prior's draws are the decoder's means
    torch.testing.assert_close(gen.latents(4, 3), gen.latents(4, 3, "prior"))
    with pytest.raises(SamplerError, match=r"no usable sampler .*has no sampler\.pt.*fit_sampler\.py"):
        gen.latents(4, 3, "gmm")
    with pytest.raises(ValueError, match="sampler must be one of"):
        gen.resolve("flow")


def test_drawing_galaxies_does_not_import_the_fitting_libraries():
    """Serve replicas, catalogue actors and jobs start without scikit-learn and SciPy's
    optimizers (about 1.5 s of import), which only fitting a sampler needs."""
    code = ("import sys, ray_galaxy.serve.app, ray_galaxy.catalogue, ray_galaxy.training.trainer; "
            "print(sorted(m for m in ('sklearn', 'scipy.optimize') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout
