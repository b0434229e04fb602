"""Evaluation: likelihood bounds, GMM sampler, nearest neighbours, and jobs/evaluate.py end to end."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, job_env
from synthetic import galaxy
from ray_galaxy import detail as D
from ray_galaxy import evaluate as E
from ray_galaxy.checkpoint import load_model_dir, save_model_dir
from ray_galaxy.config import ModelConfig
from ray_galaxy.model import ConvVAE

SIZE = 32


def _write(root: Path, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    imgs = np.stack([galaxy(SIZE, rng, sigma=rng.uniform(2.5, 5.0)) for _ in range(n)])
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(root / f"g{i:03d}.png")
    return imgs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ConvVAE trained for a few plain-torch steps, saved as a model directory."""
    root = tmp_path_factory.mktemp("evaluate")
    train_imgs = _write(root / "train", 48, seed=1)
    _write(root / "val", 24, seed=2)
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=SIZE, channels=(8, 16), latent_dim=4)
    model = ConvVAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = E.to_tensor(train_imgs)
    history = []
    for step in range(60):
        idx = torch.randint(0, len(x), (16,))
        out = model.loss(x[idx], kl_weight=1.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if step % 20 == 19:
            history.append({"epoch": len(history) + 1, "train_loss": out["loss"].item(),
                            "val_loss": out["loss"].item(), "val_bpd": 9.0 - len(history),
                            "val_psnr": 15.0 + len(history)})
    model.eval()
    uri = save_model_dir(str(root / "model"), {k: v.detach() for k, v in model.state_dict().items()}, cfg,
                         extra_config={"train": {"data": str(root / "train"), "crop": 1.0, "val_fraction": 0.1}},
                         metrics={"history": history})
    return {"root": root, "model": uri, "train": root / "train", "val": root / "val"}


def test_gmm_recovers_two_well_separated_clusters():
    rng = np.random.default_rng(0)
    a = rng.normal([-5, 0, 2], [1.0, 0.5, 0.3], size=(300, 3))
    b = rng.normal([5, 1, -2], [0.5, 1.0, 0.3], size=(100, 3))
    for cov in ("full", "diag"):
        g = E.fit_gmm(np.concatenate([a, b]), components=2, covariance=cov, seed=0)
        order = np.argsort(g["means"][:, 0])
        assert g["converged"]
        np.testing.assert_allclose(g["means"][order], [[-5, 0, 2], [5, 1, -2]], atol=0.2)
        np.testing.assert_allclose(g["weights"][order], [0.75, 0.25], atol=0.01)
        np.testing.assert_allclose(np.sqrt(np.diagonal(g["covariances"][order[0]])), [1.0, 0.5, 0.3], rtol=0.15)
    again = E.fit_gmm(np.concatenate([a, b]), components=2, seed=0)
    np.testing.assert_array_equal(again["means"], E.fit_gmm(np.concatenate([a, b]), components=2, seed=0)["means"])


def test_iwae_is_tighter_than_elbo_and_matches_the_training_loss(tiny):
    md = load_model_dir(tiny["model"])
    imgs, _ = E.load_images(str(tiny["val"]), SIZE, 1.0)
    b = E.likelihood_bounds(md.model, imgs[:16], k=16, seed=0)
    assert b["iwae_bpd"] <= b["elbo_bpd"]
    assert b["niwae_nats"] <= b["nelbo_nats"]
    # The ELBO is the training loss with KL weight 1 (one-sample estimate there, 16 here).
    torch.manual_seed(0)
    with torch.no_grad():
        loss = md.model.loss(E.to_tensor(imgs[:16]), kl_weight=1.0)["loss"].item()
    assert b["nelbo_nats"] == pytest.approx(loss, rel=0.05, abs=20)
    assert len(b["kl_per_dim"]) == 4 and sum(b["kl_per_dim"]) == pytest.approx(b["kl_nats"], rel=1e-6)


def test_reconstruction_scores_of_a_perfect_copy_and_of_noise():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    perfect = E.reconstruction_scores(x, x)
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["psnr"] == pytest.approx(100.0)
    noisy = E.reconstruction_scores(x, np.clip(x + rng.normal(0, 10, x.shape), 0, 255).astype(np.uint8))
    assert 25 < noisy["psnr"] < 30 and noisy["ssim"] < 1


def test_nearest_neighbour_finds_a_rotated_mirrored_copy():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    q = E.orient(train[[3, 7]], 6)  # rotated 180 degrees and mirrored
    d, i, o = E.nearest_neighbours(q, train)
    np.testing.assert_array_equal(i, [3, 7])
    np.testing.assert_allclose(d, 0, atol=0.01)  # float32 |q|^2 + |r|^2 - 2 q.r
    np.testing.assert_array_equal(E.orient(train[[3]], o[0]), q[:1])
    d1, _, _ = E.nearest_neighbours(q, train, orientations=1)
    assert np.all(d1 > 1)


def test_slerp_endpoints_and_norm():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    p = E.slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(p[0], a)
    torch.testing.assert_close(p[-1], b)
    torch.testing.assert_close(p.norm(dim=1), torch.full((5,), 3.0))


def test_sampler_mixture_is_fitted_to_the_codes_of_all_eight_orientations(tiny, tmp_path):
    import shutil

    uri = str(tmp_path / "model")
    shutil.copytree(tiny["model"], uri)
    md = load_model_dir(uri)
    rng = np.random.default_rng(5)
    # lopsided galaxies, so the eight orientations have different codes
    imgs = np.stack([np.roll(galaxy(SIZE, rng, sigma=3.0), (4, 7), axis=(0, 1)) for _ in range(12)])
    meta = E.fit_gmm_sampler(uri, images=imgs, components=2, detail=False)
    assert meta["orientations"] == 8 and meta["codes"] == 8 * 12 and meta["train_images"] == 12
    gmm = E.load_sampler(uri)
    mixture_mean = (gmm["weights"][:, None] * gmm["means"]).sum(0).numpy()  # = the mean code EM saw
    all8 = np.concatenate([E.encode_means(md.model, E.orient(imgs, o)) for o in range(8)])
    np.testing.assert_allclose(mixture_mean, all8.mean(0), atol=1e-6)
    assert np.abs(mixture_mean - E.encode_means(md.model, imgs).mean(0)).max() > 1e-3
    one = E.fit_gmm_sampler(uri, images=imgs, components=2, detail=False, orientations=1)
    assert one["codes"] == 12
    with pytest.raises(ValueError, match="orientations"):
        E.fit_gmm_sampler(uri, images=imgs, orientations=9)


def test_kernel_draws_sit_on_the_codes_with_their_components_shape():
    """Kernels on the codes: a code plus N(0, (b T)^2 Sigma_k) noise, k the code's component."""
    cov = np.stack([np.diag([4.0, 0.25]), np.array([[1.0, 0.9], [0.9, 1.0]])])
    codes = np.array([[10.0, 0.0], [-10.0, 5.0], [0.0, -20.0]])
    sampler = {"weights": torch.tensor([0.5, 0.5], dtype=torch.float64),
               "means": torch.zeros(2, 2, dtype=torch.float64), "covariances": torch.from_numpy(cov),
               "kernel_codes": torch.from_numpy(codes).float(), "kernel_component": torch.tensor([0, 1, 1]),
               "kernel_bandwidth": torch.tensor(0.5, dtype=torch.float64)}
    for temperature in (1.0, 2.0):
        z = E.gmm_latents(sampler, 30000, seed=4, temperature=temperature).double().numpy()
        pick = np.argmin(((z[:, None] - codes[None]) ** 2).sum(-1), 1)  # kernels far apart: unambiguous
        assert np.abs(np.bincount(pick, minlength=3) / len(z) - 1 / 3).max() < 0.02  # codes equally likely
        for i, k in enumerate([0, 1, 1]):
            dev = z[pick == i] - codes[i]
            np.testing.assert_allclose(dev.mean(0), 0, atol=0.05 * temperature)
            np.testing.assert_allclose(np.cov(dev.T), (0.5 * temperature) ** 2 * cov[k], atol=0.04 * temperature ** 2)
    torch.testing.assert_close(E.gmm_latents(sampler, 7, seed=1), E.gmm_latents(sampler, 7, seed=1))
    assert not torch.equal(E.gmm_latents(sampler, 7, seed=1), E.gmm_latents(sampler, 7, seed=2))
    plain = {k: v for k, v in sampler.items() if not k.startswith("kernel_")}
    assert np.abs(E.gmm_latents(plain, 2000, seed=4).numpy()).max() < 10  # the components: around 0


def test_sampler_kernels_follow_the_fitted_components(tiny, tmp_path):
    import shutil

    uri = str(tmp_path / "model")
    shutil.copytree(tiny["model"], uri)
    md = load_model_dir(uri)
    rng = np.random.default_rng(2)
    imgs = np.stack([galaxy(SIZE, rng) for _ in range(16)])
    meta = E.fit_gmm_sampler(uri, images=imgs, components=2, detail=False, bandwidth=0.2)
    s = E.load_sampler(uri)
    codes = np.concatenate([E.encode_means(md.model, E.orient(imgs, o)) for o in range(8)])
    np.testing.assert_allclose(s["kernel_codes"].numpy(), codes, atol=1e-6)
    logp = E._gmm_log_prob(codes, *(s[k].double().numpy() for k in ("weights", "means", "covariances")))
    np.testing.assert_array_equal(s["kernel_component"].numpy(), logp.argmax(1))
    assert meta["kernels"] == "codes" and meta["bandwidth"] == 0.2
    # a tiny bandwidth draws the training codes themselves
    E.fit_gmm_sampler(uri, images=imgs, components=2, detail=False, bandwidth=1e-9)
    z = E.sample_latents(uri, 40, seed=0, sampler="gmm").double().numpy()
    assert np.sqrt(((z[:, None] - codes[None]) ** 2).sum(-1)).min(1).max() < 1e-5
    # bandwidth 0: the mixture's components, as before kernels existed
    plain = E.fit_gmm_sampler(uri, images=imgs, components=2, detail=False, bandwidth=0)
    assert plain["kernels"] == "components" and not any(k.startswith("kernel_") for k in E.load_sampler(uri))
    z0 = E.sample_latents(uri, 40, seed=0, sampler="gmm").double().numpy()
    assert np.sqrt(((z0[:, None] - codes[None]) ** 2).sum(-1)).min(1).min() > 1e-4
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="bandwidth"):
            E.fit_gmm_sampler(uri, images=imgs, components=2, detail=False, bandwidth=bad)


def test_sampler_missing_fitted_reproducible_and_stale(tiny, tmp_path):
    import shutil

    uri = str(tmp_path / "model")
    shutil.copytree(tiny["model"], uri)
    md = load_model_dir(uri)
    torch.testing.assert_close(E.sample_latents(md, 5, seed=3), md.model.prior_latents(5, seed=3))
    with pytest.raises(E.SamplerError, match="fit_sampler.py"):
        E.sample_latents(md, 5, sampler="gmm")
    meta = E.fit_gmm_sampler(uri, components=3, seed=0)  # default training data: config.json train.data
    assert meta["components"] == 3 and meta["train_data"] == str(tiny["train"])
    assert meta["train_images"] < 48  # the training split only, not the images held out by hash
    raw = torch.load(str(tmp_path / "model" / E.SAMPLER_FILE), weights_only=True)
    assert set(raw) == {"weights", "means", "covariances", "detail_variance_coef", "detail_mix", "detail_spectrum",
                        "kernel_codes", "kernel_component", "kernel_bandwidth"}
    assert meta["kernels"] == "codes" and meta["bandwidth"] == E.KERNEL_BANDWIDTH
    assert raw["kernel_codes"].shape == (meta["codes"], 4) and float(raw["kernel_bandwidth"]) == E.KERNEL_BANDWIDTH
    assert meta["detail"]["k_min"] == 2  # 32 px: S/16
    d = meta["detail"]  # the gain brings the samples' structure-band power to the training images'
    assert D.GAIN_BOUNDS[0] <= d["gain"] <= D.GAIN_BOUNDS[1]
    assert abs(d["power_deficit_dex"]) <= abs(d["power_deficit_dex_at_gain_1"]) + 1e-9
    means = E.generate(uri, 6, seed=2, sampler="gmm", detail=False)
    drawn, again = E.generate(uri, 6, seed=2, sampler="gmm"), E.generate(md, 6, seed=2, sampler="gmm")
    torch.testing.assert_close(drawn, again)  # p(x|z) draws are reproducible by seed
    assert (drawn - means).abs().mean() > 1e-3 and drawn.min() >= 0 and drawn.max() <= 1
    torch.testing.assert_close(E.generate(uri, 6, seed=2, sampler="gmm", keep=2), drawn[:2])
    torch.testing.assert_close(E.generate(uri, 6, seed=2), drawn)  # 'auto' picks the sampler
    # traversal around the sampler's codes: the two dims the training codes vary most along
    from ray_galaxy import figures

    gmm = E.load_sampler(uri)
    img, dims = figures.sampler_traversal(md.model, gmm, steps=4)
    assert dims == tuple(int(i) for i in np.argsort(-E.gmm_variance(gmm))[:2])
    assert img.shape[0] == img.shape[1] and img.dtype == np.uint8
    z1, z2 = E.sample_latents(uri, 50, seed=1, sampler="gmm"), E.sample_latents(md, 50, seed=1, sampler="gmm")
    torch.testing.assert_close(z1, z2)
    assert z1.shape == (50, 4) and torch.isfinite(z1).all()
    sd = {k: v + 0.01 for k, v in md.model.state_dict().items()}  # "retrain": model.pt changes
    torch.save(sd, tmp_path / "model" / "model.pt")
    with pytest.raises(E.SamplerError, match="different model.pt"):
        E.sample_latents(uri, 5, sampler="gmm")


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_job_errors_clearly(tiny, tmp_path, capsys):
    job = _load_job("evaluate")
    args = ["--model", tiny["model"], "--data", str(tiny["val"]), "--out", str(tmp_path / "out")]
    assert job.main(args + ["--sampler", "gmm"]) == 2
    assert "has no sampler.pt; pass --fit-sampler" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.md").exists()
    with pytest.raises(SystemExit):
        job.main(args + ["--sampler", "flow"])
    assert "sampler must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.main(args + ["--gmm-bandwidth", "-0.5"])
    assert "gmm_bandwidth must be a finite number >= 0, got -0.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.main(["--data", str(tiny["val"]), "--out", str(tmp_path)])
    assert "--model is required" in capsys.readouterr().err


def test_fit_sampler_job(tiny, tmp_path, capsys):
    import shutil

    uri = str(tmp_path / "model")
    shutil.copytree(tiny["model"], uri)
    assert _load_job("fit_sampler").main(["--model", uri, "--components", "2", "--covariance", "diag",
                                          "--orientations", "2"]) == 0
    captured = capsys.readouterr()
    assert "fitting a 2-component GMM" in captured.err  # said before the minute of silence
    assert "2-component diag GMM" in captured.out and "in 2 orientations" in captured.out
    assert re.search(r"residual detail model \(gain \d\.\d\d: structure-band power", captured.out)
    meta = json.loads((tmp_path / "model" / E.SAMPLER_META).read_text())
    assert meta["covariance"] == "diag" and meta["orientations"] == 2 and meta["codes"] == 2 * meta["train_images"]
    assert meta["kernels"] == "codes" and meta["bandwidth"] == E.KERNEL_BANDWIDTH
    assert f"draws from kernels on the {meta['codes']} codes (bandwidth {E.KERNEL_BANDWIDTH:g})" in captured.out
    assert _load_job("fit_sampler").main(["--model", uri, "--components", "2", "--bandwidth", "0", "--no-detail"]) == 0
    assert "draws from its components" in capsys.readouterr().out
    assert json.loads((tmp_path / "model" / E.SAMPLER_META).read_text())["kernels"] == "components"
    for bad in ("-1", "inf"):
        with pytest.raises(SystemExit):
            _load_job("fit_sampler").main(["--model", uri, "--bandwidth", bad])
        assert f"--bandwidth must be a finite number >= 0, got {float(bad)}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _load_job("fit_sampler").main(["--model", uri, "--orientations", "9"])
    assert "--orientations must be in 1..8" in capsys.readouterr().err


def test_evaluate_job_end_to_end(tiny, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--model", tiny["model"], "--data", str(tiny["val"]),
           "--out", str(out), "--n", "40", "--iwae-k", "4", "--sampler", "gmm", "--fit-sampler",
           "--gmm-components", "3", "--gmm-bandwidth", "0.3"]
    r = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(linked) == pngs
    assert {"samples.png", "traversal.png", "interpolations.png", "reconstructions.png", "morphology.png",
            "power_spectrum.png", "training_curves.png", "nearest_neighbours.png", "samples_means.png"} <= set(pngs)
    m = json.loads((out / "metrics.json").read_text())
    for key in E.METRIC_KEYS:
        v = E.get_metric(m, key)
        assert isinstance(v, float) and np.isfinite(v), key
    assert m["likelihood"]["iwae_bpd"] <= m["likelihood"]["elbo_bpd"]
    assert m["held_out"]["images"] == 24 and m["held_out"]["split"] == "all"
    assert m["train"]["split"] == "train" and m["sampler_meta"]["components"] == 3
    assert m["sampler_meta"]["kernels"] == "codes" and m["sampler_meta"]["bandwidth"] == 0.3
    assert f"kernels on {m['sampler_meta']['codes']} training codes, bandwidth 0.3" in report
    assert (Path(tiny["model"]) / E.SAMPLER_FILE).is_file()
    for key in ("PSNR", "SSIM", "IWAE", "memorisation ratio", "M20", "Gini", "Residual detail"):
        assert key in report
    assert m["detail"] is True and m["sampler_meta"]["detail"]["k_min"] == 2
    assert f"scaled by {m['sampler_meta']['detail']['gain']:.2f}" in report
    assert np.isfinite(m["means_only"]["power_deficit_dex"])
    # the detail adds structure-band power the means lack
    assert m["sharpness"]["power_deficit_dex"] > m["means_only"]["power_deficit_dex"]

    # Without training data the memorisation check is skipped, and said to be.
    out2 = tmp_path / "eval2"
    cfg = E.EvaluateConfig(model=tiny["model"], data=str(tiny["val"]), out=str(out2), n=8, max_images=8,
                           iwae_k=2, train_data="none")
    m2 = E.evaluate(cfg)
    assert m2["memorisation"]["ratio"] is None and "skipped" in m2["memorisation"]["skipped"]
    assert "nearest_neighbours.png" not in m2["figures"]
    assert "skipped (--train-data none)" in (out2 / "report.md").read_text()
