"""``ensure_ray`` beside a cluster that ``ray start --head`` runs on this machine.

The cluster is real: ``ray start --head --block`` in its own process group, with its own
``RAY_TMPDIR`` so its ``ray_current_cluster`` file (what ``ray.init()`` and
``RAY_ADDRESS=auto`` look for) is not the machine's ``/tmp/ray/ray_current_cluster``, and the
suite's shared cluster is left alone. Its workers cannot import ``ray_galaxy``, as on a cluster
where the package is not installed: this venv installs it in editable mode (every local Ray
would find it), so the head's ``PYTHONPATH`` puts a ``ray_galaxy`` first that fails to import.
The jobs are subprocesses run outside the repository with no ``PYTHONPATH``: only the runtime
env that ``ensure_ray`` builds can bring the package to the workers.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, free_port

RAY = str(Path(sys.executable).parent / "ray")
# The driver imports this checkout by path (as jobs/*.py do); its workers get nothing from it.
PRELUDE = f"import sys; sys.path.insert(0, {str(REPO)!r})\nimport ray\nfrom ray_galaxy.runtime import ensure_ray\n"


def _kill_marked(marker: bytes) -> None:
    """SIGKILL every process whose environment holds ``marker`` (this module's RAY_TMPDIR): the
    head's processes, their workers and the local Rays the jobs started. ``ray stop`` would stop
    every Ray on the machine, the suite's shared cluster included."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
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


@pytest.fixture(scope="module")
def head(ray_address):
    """A one-CPU cluster from ``ray start --head``; ``env`` is the jobs' environment (no
    RAY_ADDRESS, the cluster's RAY_TMPDIR, token auth with the token the suite's ray.init made)."""
    temp = tempfile.mkdtemp(prefix="rgrt", dir="/tmp")  # short: Ray's socket paths have a length limit
    shadow = Path(temp) / "shadow" / "ray_galaxy"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("ray_galaxy is not installed on this cluster")\n')
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(RAY_TMPDIR=temp, RAY_AUTH_MODE="token")
    ports = [f"--{name}={free_port()}" for name in (
        "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port",
        "ray-client-server-port")]
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen([RAY, "start", "--head", "--num-cpus=1", "--include-dashboard=false",
                             "--disable-usage-stats", "--block", *ports],
                            env={**env, "PYTHONPATH": str(shadow.parent)}, cwd=temp, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    current = Path(temp) / "ray" / "ray_current_cluster"
    try:
        deadline = time.time() + 180
        while not current.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.3)
        assert current.exists(), (Path(temp) / "head.log").read_text()[-3000:]
        yield SimpleNamespace(address=current.read_text().strip(), env=env, cwd=temp)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # not SIGTERM: the head drains for 30 s first
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
        _kill_marked(f"RAY_TMPDIR={temp}".encode())
        shutil.rmtree(temp, ignore_errors=True)


def _job(code: str, env: dict, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + code], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_a_bad_address_is_one_error_line_in_seconds(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["RAY_ADDRESS"] = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    # prepare_data: the Ray job with the lightest imports; train.py and tune.py catch the same error
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "prepare_data.py"), "--input", str(tmp_path),
                        "--output", str(tmp_path / "shards")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"error: no Ray cluster at RAY_ADDRESS={env['RAY_ADDRESS']}: cannot connect" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.time() - t0 < 60  # Ray itself would retry for minutes


def test_without_ray_address_a_job_starts_its_own_ray_beside_a_running_cluster(head):
    r = _job("ensure_ray(num_cpus=2)\nprint('GCS', ray.get_runtime_context().gcs_address)",
             head.env, head.cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[ray-galaxy] Ray: started a local instance for this job at " in r.stdout
    assert ": 2 CPUs, 0 GPUs" in r.stdout
    gcs = r.stdout.split("GCS ")[-1].strip()
    assert gcs and gcs != head.address


def test_with_ray_address_the_package_reaches_the_workers(head):
    code = """
def where():
    import ray_galaxy.images
    return ray_galaxy.images.__file__

ensure_ray()
print('GCS', ray.get_runtime_context().gcs_address)
print('FILE', ray.get(ray.remote(where).remote(), timeout=120))
"""
    r = _job(code, {**head.env, "RAY_ADDRESS": head.address}, head.cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"Ray: joined the cluster at {head.address} (RAY_ADDRESS={head.address}): 1 CPUs, 0 GPUs" in r.stdout
    assert f"GCS {head.address}" in r.stdout
    # the workers import the copy uploaded with the job, not this checkout
    worker_file = r.stdout.split("FILE ")[-1].strip()
    assert "py_modules_files" in worker_file and not worker_file.startswith(str(REPO))


def test_a_submitted_job_without_the_package_fails_fast_with_a_clear_error(head, tmp_path):
    """RAY_ADDRESS=auto joins the cluster ``ray start`` runs here; a job "submitted" with a
    working_dir that lacks the package is not sent a second copy, and fails at once."""
    (tmp_path / "notes.txt").write_text("no code here")
    env = {**head.env, "RAY_ADDRESS": "auto",
           "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": str(tmp_path)}})}
    code = """
from ray_galaxy.runtime import ClusterError
try:
    ensure_ray()
except ClusterError as e:
    print('ERROR', e)
    print('INITIALIZED', ray.is_initialized())
"""
    r = _job(code, env, head.cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ERROR a worker of the cluster died as it started, most likely unable to import ray_galaxy" in r.stdout
    assert "`ray job submit --working-dir .`" in r.stdout and "INITIALIZED False" in r.stdout
    assert f"local module '{REPO / 'ray_galaxy'}'" not in r.stderr  # no py_modules next to the working_dir


def test_quiet_ray_drops_only_ray_datas_misleading_no_cpu_warning():
    import logging

    from ray_galaxy.runtime import quiet_ray

    quiet_ray()
    quiet_ray()  # idempotent: one filter, not two
    logger = logging.getLogger("ray.data.dataset")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else"]
    assert sum(type(f).__name__ == "_NoCpuWarning" for f in logger.filters) == 1


def test_a_submitted_jobs_relative_storage_is_warned_about(monkeypatch, capsys, tmp_path):
    """A relative --storage in a job sent with --working-dir would land in Ray's temporary copy of
    that dir (removed with the session): said in one line; absolute paths, URIs and direct runs pass."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from ray_galaxy.runtime import warn_relative_storage

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    warn_relative_storage("runs")  # run directly: ./runs is where the user is
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {"working_dir": "gcs://pkg.zip"}}))
    for fine in (str(tmp_path / "runs"), "s3://bucket/runs", "~/runs"):
        warn_relative_storage(fine)
    assert capsys.readouterr().out == ""
    warn_relative_storage("runs")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "'runs' is relative" in out[0] and str(tmp_path / "runs") in out[0]
