"""Catalogue generation: jobs/generate.py's Ray Data pipeline against the in-process decoder.

One model directory (the default preset's architecture at ``--image-size``; random weights:
the cost of drawing, decoding and PNG-encoding does not depend on what the weights learned),
the prior sampler, seed 0. Side by side in one Ray instance, alternating:

* in-process: :func:`ray_galaxy.catalogue.write_shard` called in this process on one loaded
  :class:`Generator`, shard after shard: what each of the pipeline's actors does, without Ray;
  on one torch thread (what one actor, holding 1 CPU, gets: the per-worker baseline) and on
  all cores;
* ``generate_catalogue`` (what ``jobs/generate.py`` runs) with 1 and 2 workers, end to end,
  actor start-up included.

Then memory flat in N: ``--big-n`` galaxies (default 200,000) at 32 px from a small decoder
with one worker, the driver's resident memory and the object store's use sampled every second.

    python benchmarks/generate_throughput.py                    # 64px, 8,192 galaxies per run, then 200k at 32px
    python benchmarks/generate_throughput.py --image-size 32 --n 16384 --repeats 1 --big-n 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray._private.internal_api import get_memory_info_reply, get_state_from_address  # noqa: E402

from ray_galaxy.catalogue import CatalogueConfig, generate_catalogue, plan_of, write_shard  # noqa: E402
from ray_galaxy.checkpoint import save_model_dir  # noqa: E402
from ray_galaxy.config import TrainConfig  # noqa: E402
from ray_galaxy.console import log  # noqa: E402
from ray_galaxy.generation.generator import Generator  # noqa: E402
from ray_galaxy.model import ConvVAE  # noqa: E402
from ray_galaxy.runtime import quiet_ray  # noqa: E402


def make_model(where: str, size: int, **fields: object) -> str:
    """A model directory of the default preset at ``size`` px (other TrainConfig ``fields``
    changed) with random weights."""
    torch.manual_seed(0)
    cfg = TrainConfig(image_size=size, **fields).model_config()
    model = ConvVAE(cfg)
    return save_model_dir(where, {k: v.detach() for k, v in model.state_dict().items()}, cfg,
                          extra_config={"train": {}}, metrics={})


def in_process(model: str, out: str, n: int, threads: int) -> float:
    """Galaxies/s of writing the catalogue's shards one after another in this process, with
    torch using ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _write_all(model, out, n)
    finally:
        torch.set_num_threads(before)


def _write_all(model: str, out: str, n: int) -> float:
    cfg = CatalogueConfig(model=model, n=n, out=out, sampler="prior")
    plan, _ = plan_of(cfg)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    gen = Generator.load(plan.model)
    t0 = time.time()
    done = sum(write_shard(gen, plan, k) for k in range(plan.shards))
    return done / (time.time() - t0)


def pipeline(model: str, out: str, n: int, workers: int) -> float:
    """Galaxies/s of generate_catalogue end to end (a fresh output folder)."""
    t0 = time.time()
    generate_catalogue(CatalogueConfig(model=model, n=n, out=out, sampler="prior", num_workers=workers))
    return n / (time.time() - t0)


def rss_mib() -> float:
    """This process's resident memory (Linux /proc)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def store_mib() -> float:
    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return reply.store_stats.object_store_bytes_used / 2**20


def memory_run(model: str, out: str, n: int) -> list[tuple[float, float, float]]:
    """(seconds, driver RSS MiB, object store MiB) every second while ``n`` galaxies are written."""
    samples: list[tuple[float, float, float]] = []
    stop, t0 = threading.Event(), time.time()

    def poll() -> None:
        while not stop.is_set():
            samples.append((time.time() - t0, rss_mib(), store_mib()))
            time.sleep(1.0)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    generate_catalogue(CatalogueConfig(model=model, n=n, out=out, sampler="prior", num_workers=1))
    stop.set()
    watcher.join()
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n", type=int, default=8192, help="galaxies per throughput run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--big-n", type=int, default=200_000, help="galaxies of the memory run at 32px (0: skip)")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="gen-bench-")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    quiet_ray()
    model = make_model(os.path.join(root, "model"), args.image_size)
    # Each pipeline actor holds 1 CPU, and Ray sets OMP_NUM_THREADS to it, so one worker's fair
    # baseline is the in-process decoder on one thread; "all cores" is what one process can do.
    cores = torch.get_num_threads()
    runs: dict[str, list[float]] = {"in-process": [], f"in-process, {cores} threads": [],
                                    "1 worker": [], "2 workers": []}
    for rep in range(args.repeats):
        for i, name in enumerate(runs):
            out = os.path.join(root, f"cat-{rep}-{i}")
            if name.startswith("in-process"):
                rate = in_process(model, out, args.n, 1 if name == "in-process" else cores)
            else:
                rate = pipeline(model, out, args.n, int(name[0]))
            runs[name].append(rate)
            shutil.rmtree(out, ignore_errors=True)
            log(f"benchmark: run {rep + 1}, {name}: {rate:.0f} galaxies/s")
    mean = {k: float(np.mean(v)) for k, v in runs.items()}
    log(f"benchmark: {args.image_size}px, {args.n} galaxies: in-process {mean['in-process']:.0f}/s on 1 "
        f"thread, {mean[f'in-process, {cores} threads']:.0f}/s on {cores}; "
        f"1 worker {mean['1 worker']:.0f}/s ({mean['1 worker'] / mean['in-process']:.2f}x); "
        f"2 workers {mean['2 workers']:.0f}/s ({mean['2 workers'] / mean['in-process']:.2f}x, "
        f"{mean['2 workers'] / 2 / mean['in-process']:.2f}x per worker)")
    result = {"throughput": runs, "mean": mean}
    if args.big_n:
        # A small decoder: memory is about what the pipeline holds, not what a galaxy costs.
        small = make_model(os.path.join(root, "model32"), 32, channels=(8, 16, 32, 32), latent_dim=8)
        samples = memory_run(small, os.path.join(root, "big"), args.big_n)
        tenth = max(1, len(samples) // 10)
        early, late = samples[tenth:2 * tenth], samples[-tenth:]
        log(f"benchmark: {args.big_n} galaxies at 32px in {samples[-1][0]:.0f}s; driver RSS "
            f"{np.mean([s[1] for s in early]):.0f} MiB at 10-20% of the run, {np.mean([s[1] for s in late]):.0f} "
            f"MiB in the last 10%, max {max(s[1] for s in samples):.0f}; object store max "
            f"{max(s[2] for s in samples):.1f} MiB")
        result["memory"] = samples
    print(json.dumps(result))
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
