"""Faults with real processes and real signals: a Train worker SIGKILLed mid-run is survived from
the last checkpoint; a killed job started again with the same name resumes, not restarts; a
storage outage loses no checkpoint."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, job_env
from ray_galaxy.checkpoint import load_checkpoint, load_model_dir

# --no-fit-sampler, --no-tracking: these runs are about surviving faults; the sampler fit and
# tracking are tested elsewhere.
ARGS = ["--image-size", "32", "--channels", "8,16,32,32", "--latent-dim", "4", "--batch-size", "8",
        "--num-workers", "2", "--cpus-per-worker", "0.5", "--no-fit-sampler", "--no-tracking"]


def _train_worker_pids() -> list[int]:
    """PIDs of the live Train workers of the suite's cluster (Ray's state API)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         detail=True)
    return [a.pid for a in actors]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "jobs/train.py", *args], cwd=REPO, env=job_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen, needle: str, lines: list[str], timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return True
        if time.time() > deadline:
            break
    return False


def _checkpoints_all_load(run_dir: Path) -> None:
    ckpts = sorted(run_dir.glob("checkpoint_epoch_*"))
    assert ckpts
    for c in ckpts:
        _, _, state = load_checkpoint(c)  # raises on a half-written checkpoint
        assert c.name == f"checkpoint_epoch_{state['epoch'] + 1:04d}"


def test_killed_worker_is_survived_and_a_killed_job_started_again_resumes(ray_address, tiny_folder, tmp_path):
    """One run, two faults (one job's start-up cost, which dominates at this size): a Train worker
    SIGKILLed at epoch 3 is replaced from the last checkpoint; the job itself SIGKILLed after
    that, then started again with the same command, resumes instead of restarting."""
    args = ["--data", str(tiny_folder), "--storage", str(tmp_path), "--name", "kill", "--epochs", "7",
            "--max-failures", "2", *ARGS]
    proc = _start(args)
    lines: list[str] = []
    try:
        # Epoch 3: Ray Train restores the checkpoint its controller has registered, which may lag
        # the worker's last report by a poll; two epochs back is surely registered.
        assert _read_until(proc, "epoch 3/7", lines), "".join(lines[-50:])
        victims = _train_worker_pids()
        assert len(victims) == 2
        os.kill(victims[1], signal.SIGKILL)
        assert _read_until(proc, "resuming from checkpoint after epoch", lines), "".join(lines[-50:])
        resumed = int(re.search(r"resuming from checkpoint after epoch (\d+)", lines[-1]).group(1))
        assert resumed < 6, "".join(lines[-50:])  # room left for the second fault
        # Kill the job as soon as the replacement worker group has finished one more epoch.
        assert _read_until(proc, f"epoch {resumed + 1}/7", lines), "".join(lines[-50:])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    time.sleep(3)  # let Ray notice the dead driver and release its workers
    _checkpoints_all_load(tmp_path / "kill")
    again = subprocess.run([sys.executable, "jobs/train.py", *args], cwd=REPO, env=job_env(),
                           capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "resuming from checkpoint after epoch" in again.stdout
    assert "epoch 1/7" not in again.stdout and "epoch 7/7" in again.stdout
    metrics = json.loads((tmp_path / "kill" / "model" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 8))
    _checkpoints_all_load(tmp_path / "kill")
    load_model_dir(str(tmp_path / "kill" / "model"))


def test_storage_server_outage_mid_run_loses_no_checkpoint(ray_address, s3_server, tiny_folder, tmp_path):
    """Stop the S3 server mid-run, start it again: the run retries through it or stops with a
    clear error, and every checkpoint already written stays loadable."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="outage")
    proc = _start(["--data", str(tiny_folder), "--storage", "s3://outage/runs", "--name", "outage",
                   "--epochs", "5", "--max-failures", "3", *ARGS])
    lines: list[str] = []
    try:
        assert _read_until(proc, "epoch 2/5", lines), "".join(lines[-50:])
        s3_server.stop()
        time.sleep(6)
        s3_server.start()
        out, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
        if s3_server._server is None:
            s3_server.start()
    text = "".join(lines) + (out or "")
    if proc.returncode == 0:
        assert "model directory: s3://outage/runs/outage/model" in text
    else:
        assert "error" in text.lower() and "Traceback" not in text.splitlines()[-1]
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="outage", Prefix="runs/outage/")["Contents"]]
    ckpts = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_epoch_")})
    assert ckpts, "checkpoints written before the outage must still be there"
    for name in ckpts:
        d = tmp_path / name
        d.mkdir()
        for f in ("model.pt", "optimizer.pt", "state.json"):
            s3.download_file("outage", f"runs/outage/{name}/{f}", str(d / f))
        load_checkpoint(d)
