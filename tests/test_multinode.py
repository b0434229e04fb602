"""A real two-node Ray cluster on this machine (``ray start --head`` and a second ``ray start
--address`` node, each with its own temp dir and resources), shared by two tests: an elastic
``ray job submit -- python jobs/train.py`` with a worker on each node loses the second node
mid-epoch, carries on, and grows again when a third node joins; and Serve, with a Decoder
replica on each node, keeps answering when one node goes (docs/reliability.md)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pytest

from conftest import REPO, free_port

ARTIFACTS = REPO / "test-artifacts"
# The ray CLI of the interpreter running the tests, whether or not its venv is activated.
RAY = str(Path(sys.executable).parent / "ray")


def _kill_cluster(temp_dir: str) -> None:
    """SIGKILL every process of the nodes started with ``temp_dir``: the processes whose command
    lines name it (raylet, agents, GCS) and all their descendants (the workers, whose titles Ray
    rewrites). ``ray stop`` would stop every Ray on the machine, the suite's shared cluster included."""
    procs: dict[int, tuple[int, bool]] = {}  # pid -> (parent pid, names temp_dir)
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                procs[int(d.name)] = (ppid, temp_dir.encode() in (d / "cmdline").read_bytes())
            except (OSError, ValueError, IndexError):
                pass
    doomed = {pid for pid, (_, named) in procs.items() if named}
    while True:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in doomed and pid not in doomed}
        if not more:
            break
        doomed |= more
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in doomed):
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
    # A lost node is declared dead after 3 missed health checks 1 s apart (Ray's defaults: 5 of
    # 3 s), so the node-loss test spends its time training, not waiting (docs/reliability.md).
    env.update({"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
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
        yield {"dashboard": f"http://127.0.0.1:{dash}", "env": env, "port": port, "temp_dirs": temp_dirs}
    finally:
        for temp_dir in temp_dirs:
            _kill_cluster(temp_dir)


def _start_node(two_nodes: dict, resources: str) -> str:
    """One more raylet joining the two-node cluster, with its own temp dir (killed at the end
    by the fixture's temp-dir sweep when it is registered there)."""
    temp_dir = tempfile.mkdtemp(prefix="rgmn", dir="/tmp")
    two_nodes["temp_dirs"].append(temp_dir)
    r = subprocess.run([RAY, "start", f"--address=127.0.0.1:{two_nodes['port']}", f"--resources={resources}",
                        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats", *_node_ports()],
                       env=two_nodes["env"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return temp_dir


def _alive_nodes(two_nodes: dict) -> set[str]:
    nodes = subprocess.run([RAY, "list", "nodes", "--address", two_nodes["dashboard"], "--format", "json"],
                           env=two_nodes["env"], capture_output=True, text=True, timeout=60)
    assert nodes.returncode == 0, nodes.stderr
    return {n["node_id"] for n in json.loads(nodes.stdout) if n["state"] == "ALIVE"}


def _drain_as_preemption(two_nodes: dict, short_id: str, deadline_s: int) -> str:
    """``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`` of the alive node whose id starts
    with ``short_id``, as a cloud's spot reclaim notice does; gives its full id."""
    node_id = next(n for n in _alive_nodes(two_nodes) if n.startswith(short_id))
    r = subprocess.run([RAY, "drain-node", "--address", f"127.0.0.1:{two_nodes['port']}", "--node-id", node_id,
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                        "--deadline-remaining-seconds", str(deadline_s)],
                       env=two_nodes["env"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return node_id


def _submit_lose_join_and_preempt(two_nodes: dict, cmd: list[str]) -> tuple[list[str], dict[str, float]]:
    """Run ``cmd`` (a ``ray job submit``) through three faults: SIGKILL every process of the second
    node once epoch 2 is reported (mid-epoch: lines reach the submitter a little after the epoch
    ends); start a third node one epoch after the job says it resumed; one epoch after it grew,
    drain that node as a preemption, and kill it once the job has seen the notice (as the cloud
    does at the deadline). Gives the job's output lines and the seconds from the kill to the
    resuming line and to the first epoch after it."""
    proc = subprocess.Popen(cmd, env=two_nodes["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, times, t_kill, third, grown = [], {}, 0.0, "", False
    try:
        for line in proc.stdout:
            lines.append(line)
            epoch = line.startswith("[ray-galaxy] epoch ")
            if not t_kill and line.startswith("[ray-galaxy] epoch 2/"):
                _kill_cluster(two_nodes["temp_dirs"][1])
                t_kill = time.time()
            elif t_kill and "resumed" not in times and " lost; resuming" in line:
                times["resumed"] = time.time() - t_kill
            elif "resumed" in times and "first_epoch" not in times and epoch:
                times["first_epoch"] = time.time() - t_kill
                _start_node(two_nodes, '{"third_node": 1}')
            elif " joined; resuming" in line and not third:
                third = line.split("node ")[1].split()[0]
            elif third and not grown and epoch:
                grown = True
                _drain_as_preemption(two_nodes, third, deadline_s=60)
            elif " is being preempted" in line:
                _kill_cluster(two_nodes["temp_dirs"][2])
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines)[-5000:]
    return lines, times


def test_submitted_elastic_job_survives_losing_a_node_and_grows_when_one_joins(two_nodes, tmp_path):
    """``ray job submit`` of an elastic run (1-2 workers) with one worker on each node: SPREAD, and
    1.5 of a node's 2 CPUs per worker (Train's elastic policy counts workers per node by resources
    and ignores STRICT_SPREAD, so resources keep a second worker off a node). Every process of the
    second node is SIGKILLed mid-epoch. The run goes on from its last checkpoint on the head node
    and says so in our words (no Ray dumps or tracebacks), grows back to two workers when a node
    joins, shrinks again when that node is drained as a preemption (a spot reclaim, said as such),
    and finishes with every epoch once, every checkpoint loadable, and its MLflow run in a storage
    folder that did not exist (a submitted job is tracked like a direct one)."""
    from synthetic import write_folder

    from ray_galaxy.checkpoint import load_checkpoint

    alive = _alive_nodes(two_nodes)
    assert len(alive) == 2
    data = tmp_path / "data"
    write_folder(data, 200, size=32)
    storage = tmp_path / "new" / "runs"
    # Train's worker-group start timeout bounds the wait when its elastic policy still counts the
    # lost node's CPUs (Ray's default 60 s; docs/reliability.md).
    runtime_env = json.dumps({"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}})
    lines, times = _submit_lose_join_and_preempt(two_nodes, [
        RAY, "job", "submit", "--address", two_nodes["dashboard"], "--working-dir", str(REPO),
        "--runtime-env-json", runtime_env, "--",
        "python", "jobs/train.py", "--data", str(data), "--storage", str(storage), "--name", "el",
        "--epochs", "60", "--num-workers", "1-2", "--placement-strategy", "SPREAD", "--elastic-check-s", "3",
        "--cpus-per-worker", "1.5", "--image-size", "32", "--channels", "8,16,32,32", "--latent-dim", "4",
        "--batch-size", "8", "--no-fit-sampler", "--keep-checkpoints", "20"])
    out = "".join(lines)
    ours = [line for line in lines if line.startswith("[ray-galaxy]")]
    started = [line for line in ours if "workers: 2 on 2 node(s)" in line]
    lost = [line for line in ours if "workers 2 -> 1: node" in line and " lost; resuming from checkpoint after epoch" in line]
    grew = [line for line in ours if "workers 1 -> 2: node" in line and " joined; resuming from checkpoint after epoch" in line]
    noticed = [line for line in ours if " is being preempted within " in line]
    preempted = [line for line in ours if "workers 2 -> 1: node" in line and " preempted; resuming from checkpoint" in line]
    assert len(started) == len(lost) == len(grew) == len(noticed) == len(preempted) == 1, "".join(ours)
    for noise in ("[state-dump]", "gcs_server", "Traceback", "RayTrainWorker pid=", "TrainController",
                  "marked dead", "tracking is off"):
        assert noise not in out, f"{noise!r} in the job's log:\n{out[-5000:]}"
    # Each progress line once (rank 0's, forwarded by one node's log monitor); an epoch the lost
    # group finished but could not checkpoint is trained, and printed, again after the resume.
    epoch_lines = [line for line in ours if line.startswith("[ray-galaxy] epoch ")]
    assert len(set(epoch_lines)) == len(epoch_lines), "".join(epoch_lines)
    assert sorted({int(line.split()[2].split("/")[0]) for line in epoch_lines}) == list(range(1, 61))
    # How long recovery took (docs/reliability.md quotes it): printed with -s, kept as an artifact.
    print(f"\nnode lost -> resuming line {times['resumed']:.1f} s, -> first epoch after it {times['first_epoch']:.1f} s")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "node_loss.json").write_text(json.dumps({**times, "load_average_1m": os.getloadavg()[0]}, indent=1))
    metrics = json.loads((storage / "el" / "model" / "metrics.json").read_text())
    history = metrics["history"]
    assert [h["epoch"] for h in history] == list(range(1, 61))
    resumed_after = int(lost[0].split("after epoch ")[1].split()[0])
    assert {h["workers"] for h in history[:resumed_after]} == {2} and history[resumed_after]["workers"] == 1
    assert {h["workers"] for h in history} == {1, 2} and history[-1]["workers"] == 1  # the third node went too
    for ckpt in sorted((storage / "el").glob("checkpoint_epoch_*")):
        load_checkpoint(str(ckpt))
    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    run = client.get_run(metrics["tracking"]["run_id"])
    assert run.info.status == "FINISHED"
    # A resumed group records its checkpoint's epochs again, so steps repeat; none is missing.
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "val_loss")}) == list(range(1, 61))


# --------------------------------------------------------------------------- Serve under node loss

SERVE_APP = "nodeloss"
# The ingress on the head node (a node's HTTP traffic goes through it); two Decoder replicas,
# which Serve spreads over the nodes. Batches wait 0.2 s for company, so requests sit in the
# replica on the lost node when it dies.
SERVE_OPTIONS = {"GalaxyAPI": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25, "resources": {"head_node": 0.01}},
                               "logging_config": {"enable_access_log": False}},
                 "Decoder": {"num_replicas": 2, "max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 0.5},
                             "logging_config": {"enable_access_log": False}}}
# Deployed from a driver of its own: this process is connected to the suite's shared cluster.
# One HTTP proxy, on the head node: every node of this cluster shares one machine and its ports.
DEPLOY = """
import json, sys
import ray
from ray import serve
from ray_galaxy.serve.app import build_app
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])}, proxy_location="HeadOnly")
args = {"model": sys.argv[3], "batch_wait_timeout_s": 0.2}
serve.run(build_app(args, json.loads(sys.argv[4]), token=None), name=sys.argv[5], route_prefix="/")
"""
# 20 requests/s from 8 clients for 30 s: 5 s before the loss, through it, and on while Serve replaces the replica.
SERVE_REQUESTS, SERVE_RATE, SERVE_CLIENTS, SERVE_KILL_AFTER = 600, 20.0, 8, 100


def _decoder_nodes(two_nodes: dict) -> dict[str, str]:
    """actor id -> node id of the ALIVE Decoder replicas of the test's app."""
    r = subprocess.run([RAY, "list", "actors", "--address", two_nodes["dashboard"], "--format", "json",
                        "--filter", f"class_name=ServeReplica:{SERVE_APP}:Decoder", "--filter", "state=ALIVE"],
                       env=two_nodes["env"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return {a["actor_id"]: a["node_id"] for a in json.loads(r.stdout)}


def _only_the_head_node(two_nodes: dict) -> str:
    """Kill every node but the head (those of a test before, if any) and wait until the cluster
    says so; gives the head's node id."""
    for temp_dir in two_nodes["temp_dirs"][1:]:
        _kill_cluster(temp_dir)
    deadline = time.time() + 60
    while len(alive := _alive_nodes(two_nodes)) > 1 and time.time() < deadline:
        time.sleep(0.5)
    assert len(alive) == 1, alive
    return next(iter(alive))


def test_serve_keeps_answering_when_a_node_with_a_decoder_replica_goes(two_nodes, models):
    """Decoder replicas on both nodes, the ingress and HTTP proxy on the head node, 20 requests/s
    of single galaxies; every process of the other node SIGKILLed. A request in flight on the
    lost replica fails over inside the app (the ingress retries a decoder call whose replica
    died), so the client sees 200s, later; Serve starts a replacement replica on the node that
    is left. No more requests fail than were in flight when the node went, and none with a 500."""
    from serving import drive, percentiles

    head = _only_the_head_node(two_nodes)
    temp_dir = _start_node(two_nodes, '{"serve_node": 1}')
    node = next(iter(_alive_nodes(two_nodes) - {head}))
    port = free_port()
    r = subprocess.run([sys.executable, "-c", DEPLOY, f"127.0.0.1:{two_nodes['port']}", str(port), models.a,
                        json.dumps(SERVE_OPTIONS), SERVE_APP], env=two_nodes["env"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    before = _decoder_nodes(two_nodes)
    assert sorted(before.values()) == sorted([head, node]), "Serve spreads the two replicas over the two nodes"

    reached, out = threading.Event(), {}
    plan = [("GET /sample", {"params": {"seed": i}}, "image/png") for i in range(SERVE_REQUESTS)]
    loader = threading.Thread(target=lambda: out.update(drive(
        f"http://127.0.0.1:{port}", plan, SERVE_CLIENTS, 150.0, rate=SERVE_RATE,
        on_done=lambda n: n >= SERVE_KILL_AFTER and reached.set())), daemon=True)
    loader.start()
    assert reached.wait(120), "the load did not get going"
    _kill_cluster(temp_dir)
    killed_at = time.monotonic()
    replaced_at, after = None, {}
    while replaced_at is None and time.monotonic() < killed_at + 120:
        after = _decoder_nodes(two_nodes)
        if len(after) == 2 and set(after.values()) == {head}:
            replaced_at = time.monotonic()
        time.sleep(0.5)
    loader.join(200)
    assert not loader.is_alive(), "the load did not finish"
    results = out["results"]  # (endpoint, outcome, latency s, sent at)
    in_flight = [res for res in results if res[3] < killed_at < res[3] + res[2]]
    failed = [res for res in results if res[1] != "ok"]
    stats = {"requests": len(results), "rate_rps": SERVE_RATE, "clients": SERVE_CLIENTS,
             "in_flight_at_loss": len(in_flight), "failed": len(failed),
             "failures": sorted({o for _, o, *_ in failed})[:5],
             "replaced_s": round(replaced_at - killed_at, 1) if replaced_at else None,
             "latency_in_flight": percentiles([dt for *_, dt, _ in in_flight]) if in_flight else {},
             "latency_all": percentiles([dt for _, o, dt, _ in results if o == "ok"]),
             "load_average_1m": os.getloadavg()[0]}
    print(f"\n[serve node loss] {json.dumps(stats)}")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "serve_node_loss.json").write_text(json.dumps(stats, indent=1))
    assert replaced_at is not None, f"no replacement Decoder replica within 120 s: {after}"
    assert sum(1 for *_, sent in results if sent > killed_at) >= 100, "the load did not go on past the loss"
    assert len(failed) <= len(in_flight), failed[:5]
    # A request that cannot be answered is a 503 with Retry-After (the app's own answer), never a 500.
    assert not [o for _, o, *_ in failed if not o.startswith("503")], failed[:5]
