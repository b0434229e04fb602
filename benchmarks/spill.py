"""Data under memory pressure: what Ray spills to disk while one training epoch streams prepared
Galaxy Zoo shards through ``ray job submit`` to a cluster whose object store is capped.

The pictures are prepared once (jobs/prepare_data.py, into ``--workdir``); then a private Ray
cluster is started (its own temp folder and free ports, so other Ray instances on the machine
are left alone) with ``--object-store-memory``, each run is submitted as a job, and the raylet's
spilled-bytes counter is read before and after it; the cluster's processes are stopped at the
end. One line per run: data size, store size, spilled MiB, peak store use, epoch time.

    python benchmarks/spill.py --input ../shared/datasets/gz2/train,../shared/datasets/gz2/val \\
        --image-size 128 --store-mb 80
    python benchmarks/spill.py --image-size 256 --store-mb 300 \\
        --input ../shared/datasets/gz2/train,../shared/datasets/gz2/val,../shared/datasets/gz2/extra

``--run NAME=FLAGS`` (repeatable) adds runs with extra jobs/train.py flags or environment
(``--run "cache-on=--cache on"``); the default is one run as jobs/train.py runs by default.
``--before REF`` runs each of them also with the code of git revision REF (exported into
``--workdir``), alternating with this checkout's, on the same cluster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small model: the data path is what is measured, not the compute.
TRAIN_FLAGS = ["--epochs", "1", "--no-fit-sampler", "--channels", "8,16,32,32"]


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports free now (the OS picks them)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def prepare(inputs: str, size: int, workdir: str) -> tuple[str, int]:
    """The prepared shards of ``inputs`` at ``size`` px under ``workdir`` (made once): (path, images)."""
    absolute = ",".join(os.path.abspath(p) for p in inputs.split(","))
    tag = hashlib.sha1(absolute.encode()).hexdigest()[:8]
    out = os.path.join(workdir, f"prepared-{size}px-{tag}")
    manifest = os.path.join(out, "manifest.json")
    if not os.path.exists(manifest):
        # RAY_ADDRESS=local: a Ray of its own, not the capped cluster, whose counter it would move.
        subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "prepare_data.py"), "--input", absolute,
                        "--output", out, "--image-size", str(size)], check=True,
                       env={**os.environ, "RAY_ADDRESS": "local"})
    with open(manifest) as f:
        return out, int(json.load(f)["written"])


def _with_bin_on_path() -> dict[str, str]:
    """This environment with this Python's bin folder first on PATH: the job's ``python`` and
    Ray's workers then run this interpreter, as with an activated virtualenv."""
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


class Cluster:
    """A head node of its own (temp folder, ports) with a capped object store."""

    def __init__(self, store_bytes: int, cpus: int) -> None:
        self.temp = tempfile.mkdtemp(prefix="rg-spill-", dir="/tmp")  # short: Ray's socket paths
        ports = free_ports(10)
        self.gcs, self.dashboard = f"127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"
        names = ["port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port",
                 "ray-client-server-port"]
        flags = [f"--{n}={p}" for n, p in zip(names, ports)]
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", *flags,
                        f"--num-cpus={cpus}", f"--object-store-memory={store_bytes}", f"--temp-dir={self.temp}",
                        "--include-dashboard=true", "--disable-usage-stats"],
                       check=True, stdout=subprocess.DEVNULL, env=_with_bin_on_path())

    def store(self) -> tuple[int, int]:
        """(bytes in use in the object store now, bytes spilled since the cluster started)."""
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address
        reply = get_memory_info_reply(get_state_from_address(self.gcs))
        return int(reply.store_stats.object_store_bytes_used), int(reply.store_stats.spilled_bytes_total)

    def stop(self) -> None:
        """Stop this cluster's processes only: those whose command line names its temp folder
        (``ray stop`` would stop every Ray on the machine)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)
        shutil.rmtree(self.temp, ignore_errors=True)  # its logs and spilled objects

    def _pids(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if self.temp.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
        return pids


def export_revision(ref: str, workdir: str) -> str:
    """The code of git revision ``ref`` of this checkout, exported once under ``workdir``."""
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", ref], check=True, capture_output=True,
                         text=True).stdout.strip()
    out = os.path.join(workdir, f"code-{sha}")
    if not os.path.isdir(out):
        os.makedirs(out)
        archive = subprocess.run(["git", "-C", ROOT, "archive", sha], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    return out


def one_run(cluster: Cluster, code: str, data: str, size: int, workdir: str, extra: str) -> dict[str, float]:
    """One submitted epoch: spilled MiB, peak store MiB, epoch seconds (the job's own line), job seconds."""
    peak, stop = [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], cluster.store()[0])
            except Exception:  # noqa: BLE001 - a GCS slow to answer on a loaded machine: poll again
                pass
            time.sleep(0.5)

    env_words = [w for w in shlex.split(extra) if re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
    flags = [w for w in shlex.split(extra) if w not in env_words]
    job_env = dict(w.split("=", 1) for w in env_words)
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", cluster.dashboard,
           "--working-dir", code]
    if job_env:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": job_env})]
    cmd += ["--", "python", "jobs/train.py", "--data", data, "--image-size", str(size),
            # A fresh storage folder: in one already used, the job would resume the finished run.
            "--storage", tempfile.mkdtemp(prefix="run-", dir=workdir), *TRAIN_FLAGS, *flags]
    spilled0 = cluster.store()[1]
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t0
    stop.set()
    watcher.join()
    if out.returncode:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"the job failed ({' '.join(cmd)})")
    epoch = re.findall(r"([\d.]+)s/epoch", out.stdout)
    if not epoch:
        sys.stderr.write(out.stdout[-4000:])
    cache = re.findall(r"data: (decoded once|streamed)", out.stdout)
    return {"spilled_mib": (cluster.store()[1] - spilled0) / 2**20, "peak_store_mib": peak[0] / 2**20,
            "epoch_s": float(epoch[-1]) if epoch else float("nan"), "job_s": seconds,
            "cache": "on" if cache and cache[0] == "decoded once" else "off"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folders of pictures, comma-separated")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--store-mb", type=int, default=80, help="object store of the cluster, MB (10^6 bytes)")
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the cluster")
    p.add_argument("--run", action="append", default=None, metavar="NAME=FLAGS",
                   help="a run with extra jobs/train.py flags and VAR=value environment (repeatable)")
    p.add_argument("--before", default=None, metavar="REF", help="also run the code of this git revision")
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds of the runs")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ray-galaxy-spill"),
                   help="where the prepared shards and the runs go")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    data, images = prepare(args.input, args.image_size, args.workdir)
    decoded = images * args.image_size ** 2 * 3 / 2**20
    runs = [r.split("=", 1) if "=" in r.split(" ", 1)[0] else [r, ""] for r in (args.run or ["default="])]
    codes = [("", ROOT)]
    if args.before:
        codes = [(f" before ({args.before})", export_revision(args.before, args.workdir)), (" this checkout", ROOT)]
    cluster = Cluster(args.store_mb * 10**6, args.cpus)
    print(f"cluster at {cluster.gcs} (temp {cluster.temp}): {args.store_mb} MB object store", file=sys.stderr, flush=True)
    try:
        for rep in range(args.repeats):
            for (name, extra), (label, code) in [(r, c) for r in runs for c in codes]:
                r = one_run(cluster, code, data, args.image_size, args.workdir, extra)
                print(f"{name}{label} (round {rep + 1}): {images} images at {args.image_size}px ({decoded:.0f} MiB decoded, "
                      f"cache {r['cache']}), object store {args.store_mb * 10**6 / 2**20:.0f} MiB: "
                      f"spilled {r['spilled_mib']:.1f} MiB, peak {r['peak_store_mib']:.0f} MiB, "
                      f"epoch {r['epoch_s']:.1f}s (job {r['job_s']:.0f}s)", flush=True)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
