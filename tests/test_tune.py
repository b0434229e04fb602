"""Ray Tune sweeps: search-space parsing (fast, no Ray) and a tiny real sweep as a subprocess.

The sweep runs jobs/tune.py on the shared Ray cluster: 4 trials of at most 3 epochs at 32px on
the 40 synthetic galaxies, two trials at a time, ASHA with rungs at epochs 1 and 2 (about 2
minutes on 2 cores), while an unrelated Ray instance runs on the same host. A second sweep is
killed midway and run again, which resumes it (about 2 minutes).
"""

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, free_port, job_env
from ray_galaxy.config import ConfigError, parse_config, resolve
from ray_galaxy.generation.latents import prior_latents
from ray_galaxy.plots import png
from ray_galaxy.tuning.config import TuneConfig, base_train_config, check_search_space
from ray_galaxy.tuning.results import RED, plot_trials
from ray_galaxy.tuning.space import DISTRIBUTIONS, Param, SearchSpace, parse_search_space

# --------------------------------------------------------------------------- search space


def test_search_space_parses_distributions_and_fixed_values():
    space = parse_search_space({
        "latent_dim": {"choice": [4, "8", 16]},
        "lr": {"loguniform": ["3e-4", 3e-3]},  # YAML reads 3e-4 (no dot) as text
        "kl_weight": {"uniform": [0.5, 8]},
        "blocks_per_stage": {"randint": [0, 3]},
        "batch_size": {"grid": [8, 16]},
        "kl_warmup_epochs": 0,
        "channels": [8, 16, 32, 32],
    })
    assert space.names == ["latent_dim", "lr", "kl_weight", "blocks_per_stage", "batch_size"]
    assert space.params[0] == Param("latent_dim", "choice", (4, 8, 16))
    assert space.params[1].args == (3e-4, 3e-3) and space.params[1].log_scale
    assert space.fixed == {"kl_warmup_epochs": 0, "channels": (8, 16, 32, 32)}
    ps = space.param_space()
    assert ps["channels"] == [8, 16, 32, 32] and ps["kl_warmup_epochs"] == 0
    assert ps["batch_size"] == {"grid_search": [8, 16]}
    assert sorted(ps["latent_dim"].categories) == [4, 8, 16]
    assert (ps["lr"].lower, ps["lr"].upper) == (3e-4, 3e-3)
    assert (ps["blocks_per_stage"].lower, ps["blocks_per_stage"].upper) == (0, 3)
    assert space.num_trials(3) == 6  # the grid is repeated num_samples times
    assert space.to_spec()["lr"] == {"loguniform": [3e-4, 3e-3]}
    assert parse_search_space(space.to_spec()) == space


@pytest.mark.parametrize("spec,words", [
    ({"lr": {"logunifrom": [1e-4, 1e-3]}}, ["'logunifrom'", "'lr'", *DISTRIBUTIONS]),
    ({"latent_dims": {"choice": [4, 8]}}, ["'latent_dims'", "latent_dim", "kl_weight"]),
    ({"epochs": {"choice": [3, 5]}}, ["'epochs'", "set by the sweep", "latent_dim"]),
    ({"latent_dim": {"loguniform": [4, 32]}}, ["latent_dim", "integer", "randint"]),
    ({"likelihood": {"uniform": [0, 1]}}, ["likelihood", "choice"]),
    ({"lr": {"loguniform": [0, 1e-3]}}, ["lr", "low > 0"]),
    ({"lr": {"uniform": [1e-3, 1e-4]}}, ["lr", "low must be below high"]),
    ({"lr": {"quniform": [1e-4, 1e-3]}}, ["lr", "[low, high, q]"]),
    ({"latent_dim": {"choice": [4, "eight"]}}, ["latent_dim", "'eight'"]),
    ({"latent_dim": [4, 8]}, ["latent_dim", "{choice: [4, 8]}"]),
    ({"lr": {"uniform": [1e-4, 1e-3], "choice": [1]}}, ["lr", "one {distribution: args}"]),
    ({"lr": {"choice": []}}, ["lr", "a list of values"]),
])
def test_bad_search_space_is_a_clear_config_error(spec, words):
    with pytest.raises(ConfigError) as e:
        parse_search_space(spec)
    msg = str(e.value)
    assert all(w in msg for w in words), msg


def test_sampled_values_are_checked_against_the_base_config():
    base = base_train_config(TuneConfig(image_size=32, channels=(8, 16, 32, 32)))
    check_search_space(parse_search_space({"latent_dim": {"choice": [2, 4]}}), base)
    with pytest.raises(ConfigError, match=r"latent_dim=0 .*latent_dim must be >= 1"):
        check_search_space(parse_search_space({"latent_dim": {"choice": [0, 4]}}), base)
    with pytest.raises(ConfigError, match=r"image_size=48"):
        check_search_space(parse_search_space({"image_size": {"choice": [32, 48]}}), base)
    with pytest.raises(ConfigError, match=r"batch_size=1 "):
        check_search_space(parse_search_space({"batch_size": {"randint": [1, 9]}}),
                           base_train_config(TuneConfig(num_workers=2, batch_size=8)))


def test_bad_yaml_fails_at_parse_time_with_the_reason(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("search_space:\n  lr: {logunifrom: [1e-4, 1e-3]}\n")
    with pytest.raises(SystemExit) as e:
        parse_config(TuneConfig, ["--config", str(p)], "t")
    assert e.value.code == 2
    with pytest.raises(ConfigError, match="grace_period"):
        TuneConfig(epochs=3, grace_period=5)


def test_shipped_sweep_configs_load():
    # cluster/tune.yaml spells out the defaults, as cluster/train.yaml does for training.
    assert resolve(TuneConfig, REPO / "cluster" / "tune.yaml", {}) == TuneConfig()
    gpu = resolve(TuneConfig, REPO / "cluster" / "tune-gpu.yaml", {})
    base = base_train_config(gpu)
    check_search_space(parse_search_space(gpu.search_space), base)
    assert gpu.use_gpu and base.use_gpu and base.image_size == 256 and base.epochs == gpu.epochs


def test_plot_has_one_panel_per_searched_parameter():
    space = parse_search_space({"latent_dim": {"choice": [4, 8]}, "lr": {"loguniform": [1e-4, 1e-2]}})
    rows = [{"trial_id": f"t{i}", "latent_dim": ld, "lr": lr, "best_val_bpd": bpd,
             "stopped_early": se} for i, (ld, lr, bpd, se) in
            enumerate([(4, 1e-3, 5.0, "no"), (8, 1e-4, 6.0, "yes"), (8, 3e-3, None, "no")])]
    fig = plot_trials(rows, space)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["latent_dim", "lr"]
    assert axes[1].get_xscale() == "log" and axes[0].get_xscale() == "linear"  # loguniform on a log axis
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["4", "8"]  # one tick per choice
    # Two trials reported val_bpd; the one without is left out. Filled = ran to the end, hollow =
    # stopped early, and the best trial is red.
    marks = [(line.get_xdata()[0], line.get_ydata()[0], line.get_color(), line.get_markerfacecolor())
             for line in axes[1].get_lines()]
    assert len(marks) == 2
    best = next(m for m in marks if m[1] == 5.0)
    stopped = next(m for m in marks if m[1] == 6.0)
    assert best[2] == best[3] == RED and stopped[3] == "none"
    with Image.open(io.BytesIO(png(fig))) as img:
        assert img.format == "PNG" and img.size[0] >= 2 * 300
        r, g, b = (int(RED[k:k + 2], 16) for k in (1, 3, 5))
        assert (r, g, b) in {c[:3] for _, c in img.convert("RGB").getcolors(1 << 20)}  # drawn in red
    empty = plot_trials([], SearchSpace((), {}))
    with Image.open(io.BytesIO(png(empty))) as img:
        assert img.size[0] > 0


def test_ranking_by_morphology_scores_completed_trials_and_orders_by_their_samples(models, tmp_path):
    import numpy as np
    from tiny_model import SIZE, make_tiny

    from ray_galaxy import morphology
    from ray_galaxy.imageset import load_images
    from ray_galaxy.storage import copy_folder
    from ray_galaxy.tuning.ranking import candidates_dir, rank_by_morphology, sample_distance

    tiny = make_tiny(tmp_path / "tiny")
    real = morphology.measure_all(load_images(str(tiny["val"]), SIZE, 1.0)[0])
    source = {"t1": tiny["model"], "t2": models.b}
    exported = []

    def export(row, where):
        exported.append(row["trial_id"])
        copy_folder(source[row["trial_id"]], where)

    rows = [{"trial_id": "t1", "best_val_bpd": 5.0, "status": "completed"},
            {"trial_id": "t3", "best_val_bpd": 5.5, "status": "stopped"},  # fewer epochs: not ranked
            {"trial_id": "t2", "best_val_bpd": 6.0, "status": "completed"}]
    out = rank_by_morphology(rows, export, real, str(tmp_path / "run"), n=32, seed=0)
    assert exported == ["t1", "t2"]
    d = {r["trial_id"]: r["morphology_distance"] for r in out}
    assert d["t3"] is None and all(d[t] >= 0 for t in ("t1", "t2"))
    assert d["t1"] == pytest.approx(sample_distance(candidates_dir(str(tmp_path / "run"), "t1"), real, 32, 0))
    assert [r["trial_id"] for r in out] == sorted(("t1", "t2"), key=d.get) + ["t3"]
    # B's prior samples, from a few steps of training, hold no measurable galaxy: ranked last
    assert np.isfinite(d["t1"]) and d["t1"] < d["t2"]
    assert [r["rank_morphology"] for r in out] == [1, 2, None]
    assert {r["trial_id"]: r["rank_val_bpd"] for r in out} == {"t1": 1, "t3": 2, "t2": 3}


# --------------------------------------------------------------------------- tiny real sweep

TINY = ["--num-samples", "1", "--epochs", "3", "--grace-period", "1", "--reduction-factor", "2",
        "--image-size", "32", "--channels", "8,16,32,32", "--batch-size", "8",
        "--max-concurrent-trials", "2", "--num-workers", "1"]
# A grid over lr, best first, makes ASHA's decision deterministic: trials 3 and 4 start only
# after 1 and 2 have passed the epoch-1 rung, and their near-frozen lr puts them below its cutoff.
SWEEP_YAML = """\
search_space:
  lr: {grid: [3e-3, 1e-3, 1e-5, 3e-6]}
  latent_dim: {choice: [2, 4, 8, 16]}
  kl_weight: {loguniform: [0.5, 8]}
  kl_warmup_epochs: 0
"""


@pytest.fixture(scope="module")
def other_ray_instance(ray_address):
    """An unrelated Ray instance on this host (``ray start --head`` in its own temp dir), as when
    other test sessions or jobs share the machine; stopped by killing only its own processes."""
    from ray._private.services import find_gcs_addresses
    from test_multinode import _kill_cluster, _node_ports

    temp_dir = tempfile.mkdtemp(prefix="rgoth", dir="/tmp")  # short: socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    port = free_port()
    try:
        r = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
                            "--num-cpus=1", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                            f"--temp-dir={temp_dir}",
                            "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
                            *_node_ports()], env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        find_gcs_addresses.cache_clear()
        gcs = find_gcs_addresses()
        assert len(gcs) >= 2 and any(a.endswith(f":{port}") for a in gcs), gcs
        yield port
    finally:
        _kill_cluster(temp_dir)


@pytest.fixture(scope="module")
def sweep(ray_address, other_ray_instance, tiny_folder, tmp_path_factory):
    """The tiny sweep, run while another Ray instance is up, with CPUs so tight that a trial
    which ended without its workers' CPUs being freed leaves the next trial waiting forever.

    Two trials fit at once and three do not; a trial that ASHA stops (or that reaches max_t)
    has its actor ended by Tune, and only Ray Train's placement-group cleaner frees its
    workers' CPUs. That cleaner finds its cluster through RAY_ADDRESS (set in every worker by
    ensure_ray); without it, it fails on "multiple active Ray instances" and trial 3 never starts.
    """
    import ray

    storage = tmp_path_factory.mktemp("sweeps")
    (storage / "sweep.yaml").write_text(SWEEP_YAML)
    cpus = math.floor(ray.available_resources().get("CPU", 0) * 3 / 8 * 100) / 100
    assert cpus >= 0.5, ray.available_resources()
    try:
        r = subprocess.run([sys.executable, "jobs/tune.py", "--config", str(storage / "sweep.yaml"),
                            "--data", str(tiny_folder), "--storage", str(storage), "--name", "tiny", *TINY,
                            "--cpus-per-worker", str(cpus)],
                           cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired as e:
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                      for x in (e.stdout, e.stderr))
        pytest.fail("the sweep did not finish in 420s: stopped trials' CPUs were probably never "
                    "freed (look for PlacementGroupCleaner errors)\n" + out[-6000:])
    (storage / "job.log").write_text(r.stdout + r.stderr)  # for reading after a failure
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    assert "multiple active Ray instances" not in r.stdout + r.stderr
    run_dir = storage / "tiny"
    with (run_dir / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    return run_dir, rows, r


def test_sweep_runs_every_trial_and_asha_stops_some(sweep):
    run_dir, rows, r = sweep
    assert len(rows) == 4 and len({row["trial_id"] for row in rows}) == 4
    assert all(row["status"] in ("completed", "stopped") for row in rows), rows
    for row in rows:
        assert set(row) >= {"latent_dim", "lr", "kl_weight", "best_val_bpd", "final_val_bpd",
                            "epochs_run", "stopped_early"}
        assert int(row["latent_dim"]) in (2, 4, 8, 16)
        stopped = row["stopped_early"] == "yes"
        assert (int(row["epochs_run"]) < 3) if stopped else (int(row["epochs_run"]) == 3)
    assert any(row["stopped_early"] == "yes" for row in rows), rows
    assert {float(row["lr"]) for row in rows} == {3e-3, 1e-3, 1e-5, 3e-6}
    bpd = [float(row["best_val_bpd"]) for row in rows]
    assert bpd == sorted(bpd)  # best first
    md = (run_dir / "trials.md").read_text()
    assert all(row["trial_id"] in md for row in rows)
    with Image.open(run_dir / "trials.png") as img:
        assert img.format == "PNG" and img.size[0] >= 3 * 300
    assert "Trial status" in r.stdout  # Tune's trial table
    # trials train side by side, so each epoch line names its trial (and not Ray's worker pid)
    for row in rows:
        epochs = re.findall(rf"^\[ray-galaxy\] trial {row['trial_id']}: epoch (\d+)/3 ", r.stdout, re.M)
        assert epochs == [str(e) for e in range(1, len(epochs) + 1)] and epochs, r.stdout[-6000:]
    # ...but not Ray's own chatter: Train's per-report dumps and Ray Data's per-execution lines
    out = r.stdout + r.stderr
    assert "TrainingReport(" not in out and "Starting execution of Dataset" not in out, out[-6000:]
    assert f"model directory: {run_dir / 'model'}" in r.stdout


def test_best_trial_is_published_as_a_model_directory(sweep):
    from ray_galaxy.checkpoint import load_model_dir

    run_dir, rows, _ = sweep
    best = rows[0]
    assert len({row["latent_dim"] for row in rows}) > 1  # so the check below means something
    md = load_model_dir(str(run_dir / "model"))
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["train"]["latent_dim"] == int(best["latent_dim"]) == md.model.config.latent_dim
    assert config["train"]["lr"] == pytest.approx(float(best["lr"]))
    assert config["tune"]["trial_id"] == best["trial_id"]
    assert config["tune"]["config"]["search_space"]["lr"] == {"grid": [3e-3, 1e-3, 1e-5, 3e-6]}
    assert config["tune"]["best_val_bpd"] == pytest.approx(float(best["best_val_bpd"]))
    assert md.metrics["best"]["val_bpd"] == pytest.approx(float(best["best_val_bpd"]))
    # the published model carries its fitted sampler, like a training job's
    sampler = json.loads((run_dir / "model" / "sampler.json").read_text())
    assert sampler["latent_dim"] == md.model.config.latent_dim and sampler["detail"] is not None
    images = md.model.decode(prior_latents(md.model_config.latent_dim, 4, seed=1))
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()


def test_sweep_is_recorded_in_mlflow_as_a_parent_run_and_one_child_per_trial(sweep):
    import mlflow  # imported where used: seconds of import the other tests here need not pay

    run_dir, rows, r = sweep
    client = mlflow.MlflowClient(f"sqlite:///{run_dir.parent}/mlflow.db")
    exp = client.get_experiment_by_name("ray-galaxy")
    (parent,) = client.search_runs([exp.experiment_id], "tags.job = 'tune'")
    assert parent.info.run_name == "tiny" and parent.data.params["num_samples"] == "1"
    assert f"tracking: MLflow run {parent.info.run_id}" in r.stdout
    assert parent.data.tags["best_trial"] == rows[0]["trial_id"]
    assert {"trials.png", "trials.csv", "trials.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    assert set(by_trial) == {row["trial_id"] for row in rows}
    for row in rows:
        child = by_trial[row["trial_id"]]
        assert child.data.tags["status"] == row["status"]  # ASHA's outcome: completed or stopped
        assert float(child.data.params["lr"]) == pytest.approx(float(row["lr"]))
        assert child.data.params["latent_dim"] == row["latent_dim"]
        assert child.data.metrics["epochs_run"] == int(row["epochs_run"])
        assert child.data.metrics["best_val_bpd"] == pytest.approx(float(row["best_val_bpd"]))
        history = client.get_metric_history(child.info.run_id, "val_bpd")
        assert sorted(m.step for m in history) == list(range(1, int(row["epochs_run"]) + 1))
    best = by_trial[rows[0]["trial_id"]]
    assert best.data.tags["best_trial"] == "true" and best.data.tags["model_dir"] == str(run_dir / "model")
    assert {"samples.png", "metrics.json"} <= {a.path for a in client.list_artifacts(best.info.run_id)}
    recorded = json.loads((run_dir / "model" / "metrics.json").read_text())["tracking"]
    assert recorded["run_id"] == best.info.run_id


def test_job_reports_bad_config_and_missing_data_in_one_line(ray_address, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search_space:\n  latent_dim: {choice: [0, 4]}\n")
    for args, words in (
            (["--config", str(bad), "--image-size", "32"], ["latent_dim=0", "latent_dim must be >= 1"]),
            (["--data", str(tmp_path / "nowhere")], ["does not exist"])):
        r = subprocess.run([sys.executable, "jobs/tune.py", "--storage", str(tmp_path), *args],
                           cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
        assert all(w in r.stderr for w in words) and "Traceback" not in r.stderr, r.stderr[-3000:]


# --------------------------------------------------------------------------- resume

RESUME_YAML = """\
search_space:
  lr: {grid: [3e-3, 1e-3]}
  latent_dim: 4
  kl_warmup_epochs: 0
"""
# Two trials that run side by side, --no-tracking: this test is about resuming (tracking of a
# sweep is the sweep fixture's); every job here costs tens of seconds of start-up.
RESUME = ["--num-samples", "1", "--epochs", "3", "--grace-period", "3", "--image-size", "32",
          "--channels", "8,16,32,32", "--batch-size", "8", "--max-concurrent-trials", "2",
          "--num-workers", "1", "--cpus-per-worker", "0.5", "--no-tracking"]


def _rows(run_dir: Path) -> list[dict]:
    with (run_dir / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def test_killed_sweep_resumes_and_a_finished_one_is_published_again(ray_address, tiny_folder, tmp_path):
    from ray_galaxy.checkpoint import load_model_dir

    (tmp_path / "sweep.yaml").write_text(RESUME_YAML)
    cmd = [sys.executable, "jobs/tune.py", "--config", str(tmp_path / "sweep.yaml"), "--data",
           str(tiny_folder), "--storage", str(tmp_path), "--name", "resume", *RESUME]
    run_dir = tmp_path / "resume"

    # 1. Kill the job as soon as a trial has reported its first epoch (and checkpoint). Tune
    # saves its state every second here (by default every 10s or more), so the saved state
    # already lists the trials, which started well before.
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(cmd, cwd=REPO, env=job_env({"TUNE_GLOBAL_CHECKPOINT_S": "1"}),
                                 stdout=log, stderr=subprocess.STDOUT)
        reported: set[str] = set()
        try:
            deadline = time.time() + 240
            while time.time() < deadline and first.poll() is None and not reported:
                reported = {p.parent.name for p in run_dir.glob("*/result.json") if p.stat().st_size > 0}
                time.sleep(0.1)
        finally:
            first.kill()
            first.wait()
    first_log = (tmp_path / "first.log").read_text()
    assert reported and first.returncode == -9, first_log[-4000:]  # killed, not finished
    assert all(json.loads(line)["epoch"] < 3 for t in reported
               for line in (run_dir / t / "result.json").read_text().splitlines())
    assert "starting a new sweep 'resume'" in first_log
    assert not (run_dir / "trials.csv").exists()

    # 2. The same command resumes it: the interrupted trials keep their ids, none is added.
    second = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    (tmp_path / "second.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-6000:]
    assert "resuming the interrupted sweep 'resume'" in second.stdout
    assert "resuming from checkpoint after epoch" in second.stdout  # a trial's Train run continued
    rows = _rows(run_dir)
    ids = [row["trial_id"] for row in rows]
    assert len(ids) == 2 and len(set(ids)) == 2, rows
    assert reported <= set(ids), (reported, ids)
    assert {float(row["lr"]) for row in rows} == {3e-3, 1e-3}
    assert all(row["status"] in ("completed", "stopped") for row in rows), rows
    for row in rows:  # the table holds every epoch each trial's Train run finished, before or after
        states = sorted((run_dir / "trials" / row["trial_id"]).glob("checkpoint_epoch_*/state.json"))
        history = json.loads(states[-1].read_text())["history"]
        assert len(history) == history[-1]["epoch"], history
        # A trial ASHA stops may still write one more epoch's checkpoint while its Train run is
        # torn down; Tune has stopped listening by then, so the table may end one epoch earlier.
        epochs = int(row["epochs_run"])
        assert epochs == len(history) or (row["status"] == "stopped" and epochs == len(history) - 1), (row, history)
        assert float(row["best_val_bpd"]) == pytest.approx(min(h["val_bpd"] for h in history[:epochs]))
    md = load_model_dir(str(run_dir / "model"))
    assert json.loads((run_dir / "model" / "config.json").read_text())["tune"]["trial_id"] == rows[0]["trial_id"]
    assert md.model.config.image_size == 32 and torch.isfinite(md.model.decode(prior_latents(md.model_config.latent_dim, 2, seed=0))).all()

    # 3. Run again, ranked by the samples' morphology: nothing to train; the same trials, each
    # exported, sampled and scored against the validation galaxies, and the winner published.
    (run_dir / "trials.csv").unlink()
    third = subprocess.run([*cmd, "--metric", "morphology", "--rank-samples", "48"], cwd=REPO, env=job_env(),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout[-6000:] + third.stderr[-6000:]
    assert "sweep 'resume' already finished (2 trials)" in third.stdout
    assert "Trial status" not in third.stdout and "data:" not in third.stdout  # no Tuner, no data read
    ranked = _rows(run_dir)
    assert [{k: r[k] for k in rows[0]} for r in sorted(ranked, key=lambda r: int(r["rank_val_bpd"]))] == rows
    assert [float(r["morphology_distance"]) for r in ranked] == sorted(float(r["morphology_distance"]) for r in ranked)
    assert third.stdout.count("ranking by morphology: trial ") == 2
    assert f"model directory: {run_dir / 'model'}" in third.stdout
    published = json.loads((run_dir / "model" / "config.json").read_text())["tune"]
    assert published["trial_id"] == ranked[0]["trial_id"] and published["ranked_by"] == "morphology"
    assert (run_dir / "model" / "model.pt").read_bytes() == \
        (run_dir / "candidates" / ranked[0]["trial_id"] / "model.pt").read_bytes()
    assert "Ranked by `morphology_distance`" in (run_dir / "trials.md").read_text()
    load_model_dir(str(run_dir / "model"))

    # 4. Other settings under the same name are refused, naming what changed.
    changed = subprocess.run([*cmd, "--epochs", "4"], cwd=REPO, env=job_env(), capture_output=True,
                             text=True, timeout=300)
    assert changed.returncode == 2, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert "epochs: 3 -> 4" in changed.stderr and "new --name" in changed.stderr, changed.stderr[-3000:]
