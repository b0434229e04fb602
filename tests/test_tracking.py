"""Experiment tracking (ray_galaxy/tracking.py) against real MLflow stores: a local SQLite store,
a tracking server on loopback, and a server that is not there.

The training job's and the sweep's runs are checked where those jobs already run
(tests/test_train_e2e.py, tests/test_tune.py), and the evaluation's in tests/test_evaluate.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from conftest import REPO, free_port, job_env
from ray_galaxy.config import PRESETS, TrainConfig, parse_config
from ray_galaxy.tracking import PARENT_TAG, Tracker, default_uri, resolve_uri, ui_command

SERVER_START_S = 240  # a cold `mlflow server` imports for tens of seconds on 2 busy cores


def _closed_port() -> int:
    return free_port()  # bound and released at once: nothing listens there


def test_uri_precedence_and_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_uri(str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_uri(True, "", str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_uri(True, "", str(tmp_path)) == "http://tracking.example:5000"
    assert resolve_uri(True, "http://other:5000", str(tmp_path)) == "http://other:5000"
    assert resolve_uri(False, "http://other:5000", str(tmp_path)) is None
    cfg, _ = parse_config(TrainConfig, ["--no-tracking"], "", presets=PRESETS)
    assert cfg.tracking is False
    cfg, _ = parse_config(TrainConfig, ["--tracking-uri", "http://h:1", "--experiment", "e"], "", presets=PRESETS)
    assert (cfg.tracking, cfg.tracking_uri, cfg.experiment) == (True, "http://h:1", "e")


def _log_a_run(uri: str, experiment: str) -> tuple[Tracker, Tracker]:
    parent = Tracker.start(uri, experiment, "parent", params={"lr": 0.003, "channels": [8, 16],
                                                            "nested": {"k": 2}}, tags={"job": "test"})
    assert parent.enabled, "the store should be reachable"
    parent.log_history([{"epoch": 1, "val_loss": 3.0, "skip": [1, 2]}, {"epoch": 2, "val_loss": 2.5}])
    parent.log_files({"samples.png": b"\x89PNG fake", "metrics.json": b"{}"})
    parent.set_tags({"model_dir": "/models/x"})
    child = Tracker.start(uri, experiment, "child", params={"latent_dim": 4}, parent=parent)
    child.log_metrics({"best_val_bpd": 1.25})
    child.end()
    parent.end()
    return parent, child


def _check_run(uri: str, parent: Tracker, child: Tracker) -> None:
    client = mlflow.MlflowClient(uri)
    run = client.get_run(parent.run_id)
    assert run.data.params == {"lr": "0.003", "channels": "8,16", "nested.k": "2"}
    assert run.data.tags["model_dir"] == "/models/x" and run.info.status == "FINISHED"
    history = client.get_metric_history(parent.run_id, "val_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 3.0), (2, 2.5)]
    assert "skip" not in run.data.metrics and "epoch" not in run.data.metrics
    assert sorted(a.path for a in client.list_artifacts(parent.run_id)) == ["metrics.json", "samples.png"]
    kid = client.get_run(child.run_id)
    assert kid.data.tags[PARENT_TAG] == parent.run_id and kid.data.metrics == {"best_val_bpd": 1.25}


def test_local_store_round_trip(tmp_path):
    uri = default_uri(str(tmp_path / "runs"))
    parent, child = _log_a_run(uri, "local")
    _check_run(uri, parent, child)
    # artifacts sit beside the database, not in the folder the job was started from
    assert (tmp_path / "runs" / "mlartifacts" / parent.run_id / "artifacts" / "samples.png").is_file()
    assert parent.spec() == {"uri": uri, "run_id": parent.run_id, "experiment": "local"}
    again = Tracker.attach(parent.spec())
    again.log_metrics({"late": 1.0}, step=7)
    assert mlflow.MlflowClient(uri).get_metric_history(parent.run_id, "late")[0].step == 7


def test_unreachable_server_warns_once_and_turns_tracking_off(tmp_path, capsys):
    t0 = time.time()
    t = Tracker.start(f"http://127.0.0.1:{_closed_port()}", "x", "run", params={"a": 1})
    assert not t.enabled and time.time() - t0 < 60
    t.log_metrics({"a": 1.0})
    t.log_files({"a.txt": b"a"})
    t.end()
    out = capsys.readouterr().out
    assert out.count("warning: experiment tracking is off for the rest of this job") == 1, out


def test_train_job_finishes_when_the_tracking_server_is_unreachable(ray_address, tiny_folder, tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    r = subprocess.run([sys.executable, "jobs/train.py", "--data", str(tiny_folder), "--storage", str(tmp_path),
                        "--name", "offline", "--epochs", "1", "--no-fit-sampler", "--tracking-uri", uri,
                        "--image-size", "32", "--channels", "8,16,32,32", "--latent-dim", "4",
                        "--batch-size", "8", "--cpus-per-worker", "0.5"],
                       cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = r.stdout + r.stderr
    assert out.count("warning: experiment tracking is off") == 1, out[-4000:]
    assert "Traceback" not in out
    model = tmp_path / "offline" / "model"
    assert (model / "model.pt").is_file()
    assert "tracking" not in (model / "metrics.json").read_text()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """The UI command a job prints for its store (``tracking.ui_command``), started from this
    environment on loopback (one worker: each worker imports MLflow for many seconds), killed
    with its process group at the end. It is MLflow's tracking server too: the HTTP tests log to it."""
    where = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (where / "server.log").open("w")
    mlflow_cli, *args = ui_command(f"sqlite:///{where}/mlflow.db").split()
    assert mlflow_cli == "mlflow", "the printed command should be the installed mlflow CLI"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), *args, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--artifacts-destination", str(where / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no background job workers
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + SERVER_START_S
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start in {SERVER_START_S}s:\n"
                            + (where / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield SimpleNamespace(url=url, store=f"sqlite:///{where}/mlflow.db")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_runs_logged_to_a_tracking_server_over_http(tracking_server, tmp_path):
    parent, child = _log_a_run(tracking_server.url, "over-http")
    _check_run(tracking_server.url, parent, child)
    got = mlflow.MlflowClient(tracking_server.url).download_artifacts(parent.run_id, "samples.png", str(tmp_path))
    assert Path(got).read_bytes() == b"\x89PNG fake"


def test_the_printed_ui_command_serves_the_web_app_and_the_jobs_runs(tracking_server):
    """The project's own environment has MLflow's web UI (the full package, not mlflow-skinny),
    and the UI shows the runs a job wrote straight into its SQLite store."""
    with urllib.request.urlopen(tracking_server.url + "/", timeout=30) as resp:
        page = resp.read().decode()
    assert "Unable to display MLflow UI" not in page
    assert "<title>MLflow</title>" in page and 'id="root"' in page
    bundle = re.search(r'src="(static-files/static/js/main[^"]+\.js)"', page)
    assert bundle, page[:500]
    with urllib.request.urlopen(f"{tracking_server.url}/{bundle.group(1)}", timeout=30) as resp:
        assert resp.status == 200 and len(resp.read()) > 100_000  # the app itself, not a stub
    # A run written as a job writes it: into the store's file, not through the server.
    job_run = Tracker.start(tracking_server.store, "from-a-job", "direct", params={"lr": 0.001})
    job_run.log_metrics({"val_loss": 1.5}, step=1)
    job_run.end()
    body = json.dumps({"experiment_ids": [mlflow.MlflowClient(tracking_server.store)
                                          .get_experiment_by_name("from-a-job").experiment_id]}).encode()
    req = urllib.request.Request(tracking_server.url + "/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        runs = json.loads(resp.read())["runs"]
    assert [r["info"]["run_id"] for r in runs] == [job_run.run_id]
    assert {"key": "lr", "value": "0.001"} in runs[0]["data"]["params"]
