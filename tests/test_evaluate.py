"""Evaluation: likelihood bounds, reconstruction, nearest neighbours, charts, and jobs/evaluate.py
and jobs/fit_sampler.py end to end. (The sampler itself: tests/test_generation.py.)"""

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
from tiny_model import SIZE, make_tiny

from conftest import REPO, job_env
from ray_galaxy import plots
from ray_galaxy.checkpoint import load_model_dir, save_model_dir
from ray_galaxy.evaluation import evaluate as E
from ray_galaxy.evaluation import metrics as M
from ray_galaxy.evaluation.config import EvaluateConfig
from ray_galaxy.evaluation.report import morphology_chart, power_spectrum_chart, training_curves_chart
from ray_galaxy.generation.sampler import KERNEL_BANDWIDTH, SAMPLER_FILE, SAMPLER_META
from ray_galaxy.images import orient
from ray_galaxy.imageset import load_images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ConvVAE trained for a few plain-torch steps, saved as a model directory."""
    return make_tiny(tmp_path_factory.mktemp("evaluate"))


def test_iwae_is_tighter_than_elbo_and_matches_the_training_loss(tiny):
    md = load_model_dir(tiny["model"])
    imgs, _ = load_images(str(tiny["val"]), SIZE, 1.0)
    b = M.likelihood_bounds(md.model, imgs[:16], k=16, seed=0)
    assert b["iwae_bpd"] <= b["elbo_bpd"]
    assert b["niwae_nats"] <= b["nelbo_nats"]
    # The ELBO is the training loss with KL weight 1 (one-sample estimate there, 16 here).
    torch.manual_seed(0)
    with torch.no_grad():
        loss = md.model.loss(M.to_tensor(imgs[:16]), kl_weight=1.0)["loss"].item()
    assert b["nelbo_nats"] == pytest.approx(loss, rel=0.05, abs=20)
    assert len(b["kl_per_dim"]) == 4 and sum(b["kl_per_dim"]) == pytest.approx(b["kl_nats"], rel=1e-6)


def test_reconstruction_scores_of_a_perfect_copy_and_of_noise():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    perfect = M.reconstruction_scores(x, x)
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["psnr"] == pytest.approx(100.0)
    noisy = M.reconstruction_scores(x, np.clip(x + rng.normal(0, 10, x.shape), 0, 255).astype(np.uint8))
    assert 25 < noisy["psnr"] < 30 and noisy["ssim"] < 1


def test_nearest_neighbour_finds_a_rotated_mirrored_copy():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    q = orient(train[[3, 7]], 6)  # rotated 180 degrees and mirrored
    d, i, o = M.nearest_neighbours(q, train)
    np.testing.assert_array_equal(i, [3, 7])
    np.testing.assert_allclose(d, 0, atol=0.01)  # float32 |q|^2 + |r|^2 - 2 q.r
    np.testing.assert_array_equal(orient(train[[3]], o[0]), q[:1])
    d1, _, _ = M.nearest_neighbours(q, train, orientations=1)
    assert np.all(d1 > 1)


def test_morphology_of_held_out_and_generated_sets_and_their_failures():
    rng = np.random.default_rng(0)
    real = {k: rng.normal(size=200) for k in ("concentration", "gini")}
    gen = {"concentration": np.r_[rng.normal(1.0, 1.0, 150), [np.nan] * 50], "gini": rng.normal(size=200)}
    m = M.morphology_scores(real, gen, seed=0)
    assert m["distance"]["concentration"] == pytest.approx(1.0, abs=0.3) and m["distance"]["gini"] < 0.3
    assert m["failed_fraction"] == {"real": 0.0, "generated": 0.25}
    assert m["summary"]["generated"]["concentration"]["mean"] == pytest.approx(1.0, abs=0.3)
    assert m["mean_distance"] == pytest.approx(np.mean(list(m["distance"].values())))


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(__import__("io").BytesIO(data)).size


def test_charts_are_pngs_and_survive_nans_constants_and_log_axes():
    from ray_galaxy.morphology import STATS

    rng = np.random.default_rng(0)
    real = {s: rng.normal(size=50) for s in STATS}
    gen = {s: np.r_[rng.normal(size=40), [np.nan] * 10] for s in STATS}
    gen["gini"] = np.full(50, 0.5)  # one value: the bins still span something
    gen["m20"] = np.full(50, np.nan)  # every measurement failed
    w, h = _png_size(morphology_chart(real, gen, {s: 0.1 for s in STATS} | {"m20": float("nan")}))
    assert w > h > 300  # 4 x 2 panels
    k = np.arange(1, 17.0)
    sharp = {"k": k, "power_real": 1 / k ** 2, "power_generated": np.r_[0.0, 1 / k[1:] ** 3],
             "band_cycles_per_image": [2.0, 8.0]}  # a zero cannot be drawn on a log axis: left out
    assert _png_size(power_spectrum_chart(sharp)) == (640, 420)
    hist = [{"epoch": 1, "train_loss": 3.0, "val_loss": 3.5}, {"epoch": 2, "train_loss": 2.0, "val_bpd": 7.0}]
    assert _png_size(training_curves_chart(hist))[0] == 3 * 380
    fig, (ax,) = plots.figure()
    plots.lines(ax, [("one", [1, 2, 3], [1.0, float("nan"), 2.0])], "t", "x", "y")
    assert len(ax.get_lines()[0].get_xdata()) == 2 and ax.get_legend() is None  # one series: no legend


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
    assert captured.out.index("fitting a 2-component GMM") < captured.out.index("fitted a")  # before the wait
    assert "2-component diag GMM" in captured.out and "in 2 orientations" in captured.out
    assert re.search(r"residual detail model \(galaxy, gain \d\.\d\d: structure-band power", captured.out)
    meta = json.loads((tmp_path / "model" / SAMPLER_META).read_text())
    assert meta["covariance"] == "diag" and meta["orientations"] == 2 and meta["codes"] == 2 * meta["train_images"]
    assert meta["kernels"] == "codes" and meta["bandwidth"] == KERNEL_BANDWIDTH
    assert f"draws from kernels on the {meta['codes']} codes (bandwidth {KERNEL_BANDWIDTH:g})" in captured.out
    assert _load_job("fit_sampler").main(["--model", uri, "--components", "2", "--bandwidth", "0", "--no-detail"]) == 0
    assert "draws from its components" in capsys.readouterr().out
    assert json.loads((tmp_path / "model" / SAMPLER_META).read_text())["kernels"] == "components"
    for bad in ("-1", "inf"):
        with pytest.raises(SystemExit):
            _load_job("fit_sampler").main(["--model", uri, "--bandwidth", bad])
        assert f"--bandwidth must be a finite number >= 0, got {float(bad)}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _load_job("fit_sampler").main(["--model", uri, "--orientations", "9"])
    assert "--orientations must be in 1..8" in capsys.readouterr().err


def test_fit_sampler_job_fits_a_decoder_that_draws_one_flat_image(tiny, tmp_path, capsys):
    # Issue 31: 2 epochs on 96 images with --labels left a decoder whose means are one flat image;
    # the residual fit crashed in np.bincount and jobs/fit_sampler.py showed the traceback.
    md = load_model_dir(tiny["model"])
    state = md.model.state_dict()
    state["decoder.4.weight"].zero_()  # the last conv: every image decodes to the same grey
    state["decoder.4.bias"].fill_(-1.0)
    uri = save_model_dir(str(tmp_path / "flat"), state, md.model_config,
                         extra_config={"train": md.train_config}, metrics=md.metrics)
    csv = tmp_path / "labels.csv"
    csv.write_text("id,morphology\n" + "".join(f"g{i:03d},{'spiral' if i % 2 else 'round'}\n" for i in range(48)))
    assert _load_job("fit_sampler").main(["--model", uri, "--components", "2", "--labels", str(csv)]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "per label: round (" in out.out
    detail = json.loads((tmp_path / "flat" / SAMPLER_META).read_text())["detail"]
    assert detail["variance_coef"][0] > 0 and detail["variance_coef"][1:] == [0.0, 0.0]
    assert _load_job("fit_sampler").main(["--model", uri, "--components", "2", "--detail", "sky"]) == 0
    assert "residual detail model (sky, gain 1.00" in capsys.readouterr().out


def test_evaluate_job_end_to_end(tiny, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--model", tiny["model"], "--data", str(tiny["val"]),
           "--out", str(out), "--n", "40", "--iwae-k", "4", "--sampler", "gmm", "--fit-sampler",
           "--gmm-components", "3", "--gmm-bandwidth", "0.3", "--realism-steps", "10,30",
           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--experiment", "evaluations"]
    r = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(linked) == pngs
    assert {"samples.png", "traversal.png", "interpolations.png", "reconstructions.png", "morphology.png",
            "power_spectrum.png", "training_curves.png", "nearest_neighbours.png", "samples_means.png",
            "side_by_side.png", "realism_surest.png", "requested_vs_measured.png"} <= set(pngs)
    with Image.open(out / "side_by_side.png") as img:  # three titled panels of 2 x 8 galaxies, one above the other
        assert img.height > img.width / 8 * 3 * 2 * 0.8
    m = json.loads((out / "metrics.json").read_text())
    for key in M.METRIC_KEYS:
        v = M.get_metric(m, key)
        assert isinstance(v, float) and np.isfinite(v), key
    assert m["likelihood"]["iwae_bpd"] <= m["likelihood"]["elbo_bpd"]
    assert m["held_out"]["images"] == 24 and m["held_out"]["split"] == "all"
    assert m["train"]["split"] == "train" and m["sampler_meta"]["components"] == 3
    assert m["sampler_meta"]["kernels"] == "codes" and m["sampler_meta"]["bandwidth"] == 0.3
    assert f"kernels on {m['sampler_meta']['codes']} training codes, bandwidth 0.3" in report
    assert (Path(tiny["model"]) / SAMPLER_FILE).is_file()
    for key in ("PSNR", "SSIM", "IWAE", "memorisation ratio", "M20", "Gini", "Residual detail"):
        assert key in report
    assert m["detail"] is True and m["sampler_meta"]["detail"]["k_min"] == 2
    assert f"scaled by {m['sampler_meta']['detail']['gain']:.2f}" in report
    assert np.isfinite(m["means_only"]["power_deficit_dex"])
    # The realism test ran on samples, means and the real halves (its power: tests/test_realism.py).
    real_vs = m["realism"]
    assert real_vs["generated"]["n_per_set"] == 24 and real_vs["floor"]["n_per_set"] == 12
    assert len(real_vs["means"]["fold_accuracies"]) == 2 and real_vs["steps"] == [10, 30]
    assert set(real_vs["floor"]["by_steps"]) == {"10", "30"} and real_vs["generated"]["steps"] == 30
    g = real_vs["generated"]["by_steps"]
    assert "## Realism" in report and (f"| generated images | {g['10']['accuracy']:.3f} ± {g['10']['spread']:.3f} | "
                                       f"{g['30']['accuracy']:.3f} ±") in report
    # the detail adds structure-band power the means lack
    assert m["sharpness"]["power_deficit_dex"] > m["means_only"]["power_deficit_dex"]
    # The means' morphology distances and high-pass sharpness sit next to the samples', in the
    # JSON and in the report's tables.
    from ray_galaxy.morphology import STATS

    assert set(m["morphology"]["distance_means"]) == set(STATS)
    assert m["morphology"]["mean_distance_means"] == pytest.approx(m["means_only"]["morphology_mean_distance"])
    hp = m["sharpness"]["highpass"]
    assert np.isfinite(hp["median"]["means"]) and np.isfinite(hp["distance"]["means"])
    assert "| means mean ± sd | means W/sd |" in report and "## High-pass sharpness" in report
    assert re.search(r"\| means \| -?\d\.\d{4} \| \d+\.\d{3} \| \d+\.\d%", report)

    # A model without an MLflow run of its own: the evaluation is a new run in the store asked for.
    import mlflow  # imported where used: seconds of import the other tests here need not pay

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("evaluations").experiment_id])
    assert run.data.tags["job"] == "evaluate" and run.data.params["model"] == tiny["model"]
    assert run.data.metrics["eval.likelihood.iwae_bpd"] == pytest.approx(m["likelihood"]["iwae_bpd"])
    assert run.data.metrics["eval.realism.generated.accuracy"] == pytest.approx(real_vs["generated"]["accuracy"])
    assert {"evaluation/report.md", "evaluation/morphology.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert f"tracking: evaluation recorded in MLflow run {run.info.run_id}" in r.stdout
    # Galaxies to order: every held-out galaxy requested, in the report, metrics.json and MLflow.
    assert m["properties"]["match"]["requests"] == 24 and "## Galaxies to order" in report
    assert run.data.metrics["eval.properties.match.per_property.r50_px.floor"] == pytest.approx(
        m["properties"]["match"]["per_property"]["r50_px"]["floor"])

    # Without training data the memorisation check is skipped, and said to be.
    out2 = tmp_path / "eval2"
    cfg = EvaluateConfig(model=tiny["model"], data=str(tiny["val"]), out=str(out2), n=8, max_images=8,
                           iwae_k=2, train_data="none", tracking=False, detail=False, realism=False)
    m2 = E.evaluate(cfg)
    assert m2["memorisation"]["ratio"] is None and "skipped" in m2["memorisation"]["skipped"]
    assert "nearest_neighbours.png" not in m2["figures"]
    assert "skipped (--train-data none)" in (out2 / "report.md").read_text()
    assert m2["detail"] is False and "means W/sd" not in (out2 / "report.md").read_text()  # no means column
    assert m2["sharpness"]["highpass"]["median"]["means"] is None
    assert "| means |" not in (out2 / "report.md").read_text()
    assert m2["realism"] is None and "## Realism" not in (out2 / "report.md").read_text()


def test_morphology_scores_put_the_means_next_to_the_samples():
    rng = np.random.default_rng(0)
    real = {k: rng.normal(size=200) for k in ("concentration", "gini")}
    gen = {k: rng.normal(size=200) for k in real}
    means = {k: rng.normal(2.0, 1.0, 200) for k in real}
    m = M.morphology_scores(real, gen, seed=0, m_means=means)
    assert all(m["distance_means"][k] > 1.5 > 0.3 > m["distance"][k] for k in real)
    assert m["failed_fraction"]["means"] == 0.0 and m["summary"]["means"]["gini"]["mean"] == pytest.approx(2, abs=0.2)
    assert "distance_means" not in M.morphology_scores(real, gen, seed=0)
