"""Galaxies/s through Ray Serve over HTTP against the decoder called in-process, side by side.

The same work on both sides: N single-galaxy requests ``GET /sample?seed=i&sampler=prior``
(i = 0..N-1; the prior, so a model directory with a fitted sampler does not add its residual
detail on one side only), each one decoded and PNG-encoded. In-process, the latents of those N requests are decoded with
the same torch thread count as the Serve decoder replica, in batches of the size that is
fastest here (swept first), and PNG-encoded; it runs right before and after each HTTP run and
the mean is the baseline. Over HTTP, ``--concurrency`` client threads send the N requests and
Serve's dynamic batching stacks them, for each ``--batch-sizes`` value (1 = batching off);
then p50/p99 latency of one request at a time. With ``--per-request K`` (default 16) the same
N galaxies are also fetched as N/K ``POST /sample {"n": K, "format": "zip"}`` requests (K
PNGs each), the way a program that wants many galaxies asks for them. Prints one JSON object.

With ``--proxies default,haproxy`` each proxy runs in its own Ray (HAProxy mode is set when Ray
starts), one after the other, ``--rounds`` times alternating, and a side-by-side summary comes
first: single-galaxy ratio, p50 of one request at a time, /healthz per second, bulk ratio. A
``+fused`` suffix (``haproxy+fused``) serves with ``fused: true``: the decoder inside the ingress
replica (one replica with the decoder's CPUs) instead of a Decoder deployment of its own; a
``+optimized`` suffix sets ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (Serve's throughput preset).

    python benchmarks/serve_throughput.py --model runs/galaxy-vae/model
    python benchmarks/serve_throughput.py --model runs/galaxy-vae/model --proxies default,haproxy,haproxy+fused --rounds 2
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def in_process(model, n: int, batch: int) -> dict:
    """Galaxies/s decoding + PNG-encoding the N requests' latents in this process."""
    import numpy as np
    import torch

    from ray_galaxy.generation.latents import prior_latents
    from ray_galaxy.images import png_bytes
    from ray_galaxy.model import to_uint8

    z = torch.cat([prior_latents(model.config.latent_dim, 1, seed=i) for i in range(n)])
    model.decode(z[:batch])  # warm-up
    t0 = time.perf_counter()
    images = [to_uint8(model.decode(z[i:i + batch])).numpy() for i in range(0, n, batch)]
    t_decode = time.perf_counter() - t0
    pngs = [png_bytes(im) for im in np.concatenate(images)]
    t_all = time.perf_counter() - t0
    assert len(pngs) == n
    return {"galaxies_per_s": n / t_all, "decode_only_galaxies_per_s": n / t_decode}


def http_throughput(url: str, n: int, concurrency: int, path: str = "/sample?seed={}&sampler=prior") -> float:
    import requests

    local = threading.local()

    def get(i: int) -> int:
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        r = s.get(url + path.format(i), timeout=120)
        assert r.status_code == 200, r.text
        return len(r.content)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(get, range(min(n, 2 * concurrency))))  # warm-up (connections, first batches)
        t0 = time.perf_counter()
        list(pool.map(get, range(n)))
        return n / (time.perf_counter() - t0)


def http_bulk_throughput(url: str, n: int, per_request: int, concurrency: int) -> float:
    """Galaxies/s fetching ``n`` galaxies as zips of ``per_request`` PNGs each."""
    import io
    import zipfile

    import requests

    local = threading.local()

    def post(i: int) -> int:
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        r = s.post(url + "/sample", json={"n": per_request, "seed": i, "format": "zip", "sampler": "prior"}, timeout=300)
        assert r.status_code == 200, r.text
        count = len(zipfile.ZipFile(io.BytesIO(r.content)).namelist())
        assert count == per_request
        return count

    requests_n = max(1, n // per_request)
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, range(min(requests_n, concurrency))))  # warm-up
        t0 = time.perf_counter()
        got = sum(pool.map(post, range(requests_n)))
        return got / (time.perf_counter() - t0)


def http_latency(url: str, n: int) -> dict:
    import requests

    s = requests.Session()
    for i in range(5):
        s.get(f"{url}/sample?seed={i}&sampler=prior", timeout=60)
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        r = s.get(f"{url}/sample?seed={10_000 + i}&sampler=prior", timeout=60)
        lat.append(time.perf_counter() - t0)
        assert r.status_code == 200
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * q[98], "requests": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/galaxy-vae/model")
    p.add_argument("--requests", type=int, default=768, help="single-galaxy requests per throughput run")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--latency-requests", type=int, default=100)
    p.add_argument("--batch-sizes", default="16,4,1",
                   help="Serve max_batch_size values to run; 1 is batching off (default 16,4,1)")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--decoder-cpus", type=float, default=1.0, help="num_cpus of the decoder replica")
    p.add_argument("--threads", type=int, default=1, help="torch threads, decoder replica and in-process alike")
    p.add_argument("--per-request", type=int, default=16,
                   help="galaxies per POST /sample in the bulk run (0: skip it; default 16)")
    p.add_argument("--chunk-rows", type=int, default=0,
                   help="decode_chunk_rows of the Serve app (0 = auto: 1 on CPU)")
    p.add_argument("--out", default=None, help="also write the JSON here (Ray may print to stdout too)")
    p.add_argument("--proxies", default="default",
                   help="HTTP proxies to compare, each in its own Ray: default, haproxy, either with +fused "
                        "(the decoder inside the ingress), comma-separated (e.g. default,haproxy,haproxy+fused)")
    p.add_argument("--rounds", type=int, default=1, help="with several proxies: runs of each, alternating")
    p.add_argument("--haproxy-threads", type=int, default=0,
                   help="HAProxy's nbthread (RAY_SERVE_HAPROXY_NBTHREAD; 0: Ray's default, 4)")
    p.add_argument("--proxy", default=None, help=argparse.SUPPRESS)  # internal: this process runs one proxy
    args = p.parse_args()
    if args.proxy is None:
        return compare_proxies(args)
    proxy, *extras = args.proxy.split("+")
    unknown = set(extras) - {"fused", "optimized"}
    if proxy not in ("default", "haproxy") or unknown:
        sys.exit(f"error: setup {args.proxy!r}: a proxy (default, haproxy) and +fused / +optimized, e.g. haproxy+fused")
    fused = "fused" in extras
    if "optimized" in extras:  # Serve's throughput preset (ray/serve/_private/constants.py), before Ray starts
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if args.haproxy_threads:
        os.environ["RAY_SERVE_HAPROXY_NBTHREAD"] = str(args.haproxy_threads)
    if proxy == "haproxy":  # before Ray starts: every Ray process of this run inherits it
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import socket

    import ray
    import torch
    from ray import serve

    from ray_galaxy.checkpoint import load_model_dir
    from ray_galaxy.serve.app import build_app

    model = os.path.abspath(args.model) if "://" not in args.model else args.model
    torch.set_num_threads(args.threads)
    local_model = load_model_dir(model).model
    # The in-process baseline is the decoder at its best batch size on this machine (on a CPU,
    # small batches are faster per image: the float64 activations of big ones spill the cache).
    sweep: dict[int, dict] = {}
    for _ in range(2):  # best of two rounds per size: a shared machine's hiccups only slow one
        for b in (1, 2, 4, 8, 16, 32):
            r = in_process(local_model, min(args.requests, 256), b)
            if b not in sweep or r["galaxies_per_s"] > sweep[b]["galaxies_per_s"]:
                sweep[b] = r
    best = max(sweep, key=lambda b: sweep[b]["galaxies_per_s"])

    ray.init(logging_level="error", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    url = f"http://127.0.0.1:{port}/bench"
    # Whether HAProxy really fronts Serve in this run (the flag alone does not prove it).
    haproxy_seen = any(b"haproxy" in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0]
                       for pid in os.listdir("/proc") if pid.isdigit() and os.path.exists(f"/proc/{pid}/cmdline"))
    results = {}
    for batch in batch_sizes:
        cfg = {"model": model, "max_batch_size": batch, "batch_wait_timeout_s": args.batch_wait_timeout_s,
               "torch_threads": args.threads, "decode_chunk_rows": args.chunk_rows, "fused": fused}
        options = {"GalaxyAPI": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
                   "Decoder": {"num_replicas": 1, "max_ongoing_requests": max(64, 2 * batch),
                               "ray_actor_options": {"num_cpus": args.decoder_cpus}}}
        if fused:  # one deployment: the ingress with the decoder's CPUs
            options = {"GalaxyAPI": {"num_replicas": 1, "max_ongoing_requests": max(64, 2 * batch),
                                     "ray_actor_options": {"num_cpus": args.decoder_cpus}}}
        # A fresh app each time: a rolling update with max_surge would need room for a second
        # decoder replica, which a 2-core machine does not have.
        serve.run(build_app(cfg, options, token=None), name="bench", route_prefix="/bench",
                  logging_config={"log_level": "WARNING", "enable_access_log": False})
        # The in-process baseline runs right before and after each HTTP run (Serve idle), so
        # load from other processes on a shared machine hits both sides alike.
        before = in_process(local_model, args.requests, best)
        rate = http_throughput(url, args.requests, args.concurrency)
        bulk = None
        if args.per_request and batch == batch_sizes[0]:
            bulk = http_bulk_throughput(url, args.requests, args.per_request,
                                        max(1, min(args.concurrency, args.requests // args.per_request // 4)))
        after = in_process(local_model, args.requests, best)
        baseline = (before["galaxies_per_s"] + after["galaxies_per_s"]) / 2
        if fused:
            stats = {"rows": 0, "batches": 0}  # the batching counters live inside the ingress
        else:
            stats = serve.get_deployment_handle("Decoder", app_name="bench").stats.remote().result(timeout_s=60)
        if "http_stack_only_healthz_per_s" not in results:  # HTTP alone: same clients, no decoding
            results["http_stack_only_healthz_per_s"] = http_throughput(url, args.requests, args.concurrency,
                                                                       "/healthz")
        results[f"serve_max_batch_size_{batch}"] = {
            "http_galaxies_per_s": rate,
            "in_process_galaxies_per_s": baseline,
            "in_process_runs": [before, after],
            "ratio_vs_in_process": rate / baseline,
            **({"bulk_galaxies_per_request": args.per_request, "bulk_http_galaxies_per_s": bulk,
                "bulk_ratio_vs_in_process": bulk / baseline} if bulk else {}),
            "mean_batch_rows": stats["rows"] / stats["batches"] if stats["batches"] else None,
            "latency_single_request": http_latency(url, args.latency_requests),
        }
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    report = json.dumps({
        "model": model,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "threads": args.threads,
        "decoder_cpus": args.decoder_cpus,
        "decode_chunk_rows": args.chunk_rows,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "proxy": proxy,
        "fused": fused,
        "throughput_optimized": "optimized" in extras,
        "haproxy_threads": args.haproxy_threads or None,
        "haproxy_process_seen": haproxy_seen,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "in_process_batch_sweep": {b: r["galaxies_per_s"] for b, r in sweep.items()},
        "in_process_best_batch": best,
        **results,
        "load_average_1m_at_end": os.getloadavg()[0],
    }, indent=1)
    print(report, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


def _summary(run: dict) -> dict:
    first = next(v for k, v in run.items() if k.startswith("serve_max_batch_size_"))
    return {"single_galaxy_ratio": first["ratio_vs_in_process"],
            "p50_ms_one_at_a_time": first["latency_single_request"]["p50_ms"],
            "healthz_per_s": run["http_stack_only_healthz_per_s"],
            "bulk_ratio": first.get("bulk_ratio_vs_in_process")}


def compare_proxies(args: argparse.Namespace) -> None:
    """Run this benchmark once per proxy and round, each in a fresh process (and Ray), and print
    the side-by-side summary (means over rounds) before every run's full figures."""
    proxies = [p.strip() for p in args.proxies.split(",") if p.strip()]
    runs: dict[str, list[dict]] = {p: [] for p in proxies}
    argv = [a for a in sys.argv[1:]]
    for i in range(args.rounds):
        for proxy in (proxies if i % 2 == 0 else proxies[::-1]):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                cmd = [sys.executable, os.path.abspath(__file__), *argv, "--proxy", proxy, "--out", out.name]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                runs[proxy].append(json.load(open(out.name)))
            print(f"round {i + 1}, {proxy}: {_summary(runs[proxy][-1])}", file=sys.stderr, flush=True)
    summary = {}
    for proxy, rs in runs.items():
        values = {k: [_summary(r)[k] for r in rs if _summary(r)[k] is not None] for k in _summary(rs[0])}
        summary[proxy] = {k: statistics.mean(v) for k, v in values.items() if v}
        summary[proxy]["haproxy_process_seen"] = all(r.get("haproxy_process_seen") for r in rs)
    report = json.dumps({"side_by_side_means": summary, "rounds": args.rounds, "runs": runs}, indent=1)
    print(report, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
