"""The same job on a real two-node Ray cluster on this machine: ``ray start --head``, a second
``ray start --address`` node with its own resources, ``ray job submit -- python jobs/train.py``
with two workers that must land on different nodes."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from conftest import REPO, free_port

# The ray CLI of the interpreter running the tests, whether or not its venv is activated.
RAY = str(Path(sys.executable).parent / "ray")


def _kill_cluster(temp_dir: str) -> None:
    """Stop only this cluster's processes (their command lines name its temp dir).

    ``ray stop`` would stop every Ray on the machine, the suite's shared cluster included.
    """
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if temp_dir.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)


def _node_ports() -> list[str]:
    # Every node on one machine needs its own agent and metrics ports.
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]


@pytest.fixture(scope="module")
def two_nodes(ray_address):
    # One temp dir per node, as on two machines. A shared one makes both nodes' log monitors
    # forward every worker's lines (each line twice in the job's log), and lets one node's
    # runtime-env agent unpack the job's working dir over the other's while the driver runs in it.
    # Short names: Ray's socket paths have a length limit.
    temp_dirs = [tempfile.mkdtemp(prefix="rgmn", dir="/tmp") for _ in range(2)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # the token made by the suite's ray.init is in ~/.ray/auth_token
    # The job's `python` is looked up on PATH: the tests' interpreter, activated venv or not.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    port, dash = free_port(), free_port()
    try:
        for temp_dir, args in zip(temp_dirs, (
                ["--head", f"--port={port}", f"--dashboard-port={dash}", "--include-dashboard=true",
                 f"--ray-client-server-port={free_port()}", '--resources={"head_node": 1}'],
                [f"--address=127.0.0.1:{port}", '--resources={"second_node": 1}'])):
            r = subprocess.run([RAY, "start", *args, "--num-cpus=2", f"--temp-dir={temp_dir}",
                                "--disable-usage-stats", *_node_ports()],
                               env=env, capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        yield {"dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        for temp_dir in temp_dirs:
            _kill_cluster(temp_dir)


def test_job_submit_places_two_workers_on_two_nodes(two_nodes, tiny_folder, tmp_path):
    env, address = two_nodes["env"], two_nodes["dashboard"]
    nodes = subprocess.run([RAY, "list", "nodes", "--address", address, "--format", "json"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert nodes.returncode == 0, nodes.stderr
    alive = {n["node_id"] for n in json.loads(nodes.stdout) if n["state"] == "ALIVE"}
    assert len(alive) == 2
    storage = tmp_path / "new" / "runs"  # does not exist yet: the job makes it, and its MLflow store
    r = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "jobs/train.py", "--data", str(tiny_folder), "--storage", str(storage), "--name", "mn",
         "--epochs", "2", "--num-workers", "2", "--placement-strategy", "STRICT_SPREAD",
         "--cpus-per-worker", "1", "--image-size", "32", "--channels", "8,16,32,32", "--latent-dim", "4",
         "--batch-size", "8", "--no-fit-sampler"],
        env=env, capture_output=True, text=True, timeout=480)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "succeeded" in r.stdout + r.stderr
    model_dir = storage / "mn" / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.pt").is_file()
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert all(h["worker_nodes"] == 2 for h in metrics["history"])
    assert set(metrics["best"]["worker_node_ids"]) == alive
    # Each progress line once (rank 0's, forwarded by one node's log monitor), and no tracking warning.
    out = r.stdout + r.stderr
    assert [line.split()[2] for line in out.splitlines() if line.startswith("[ray-galaxy] epoch ")] == ["1/2", "2/2"]
    assert "tracking is off" not in out
    # A submitted job is tracked like a direct run, in the new storage folder.
    run = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db").get_run(metrics["tracking"]["run_id"])
    assert run.info.status == "FINISHED"
    assert len(mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db").get_metric_history(run.info.run_id, "val_loss")) == 2
