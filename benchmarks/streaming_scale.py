"""Streaming cost against data size: time to the first training batch and peak object-store use.

Prepared shards of N generated galaxies (N = 2,000 and 20,000 by default, 64px), written once
by jobs/prepare_data.py's own code. For each, alternating small, large, small, large: the
training datasets are built with ``load_datasets(..., cache="off")`` (what ``jobs/train.py
--cache off`` and auto on a large set do) and iterated as torch batches with the training
loop's local shuffle buffer. Measured: seconds from the call to the first batch in hand, and
the object store's peak bytes in use over the whole epoch (polled from the raylet every 0.2 s).

Then one run in a fresh Ray whose object store is capped far below the large set's decoded
size (``--capped-mib``, default 100 MiB against 235 MiB): it streams the whole epoch and
reports what Ray spilled to disk.

    python benchmarks/streaming_scale.py                      # 2,000 vs 20,000 at 64px, then the capped run
    python benchmarks/streaming_scale.py --sizes 2000,20000 --repeats 2 --capped-mib 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import ray  # noqa: E402
from PIL import Image  # noqa: E402
from ray._private.internal_api import get_memory_info_reply, get_state_from_address  # noqa: E402

from ray_galaxy.runtime import quiet_ray  # noqa: E402
from ray_galaxy.prepare import PrepareConfig, prepare  # noqa: E402
from ray_galaxy.streaming import load_datasets  # noqa: E402
from ray_galaxy.training.loop import SHUFFLE_BUFFER_ROWS  # noqa: E402

SIZE = 64
BATCH = 32


def write_galaxies(folder: str, n: int, seed: int = 0) -> None:
    """``n`` distinct synthetic galaxies (Sersic-like blobs of random size, ellipticity,
    angle and colour on a noisy sky) as PNG files."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        r, q, a = rng.uniform(3, 12), rng.uniform(0.4, 1), rng.uniform(0, np.pi)
        u = xx * np.cos(a) + yy * np.sin(a)
        v = (-xx * np.sin(a) + yy * np.cos(a)) / q
        light = np.exp(-np.hypot(u, v) / r)[..., None] * rng.uniform(0.5, 1, 3)
        img = np.clip(light + rng.normal(0.03, 0.02, (SIZE, SIZE, 3)), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(folder, f"g{i:06d}.png"))


def make_shards(root: str, n: int) -> str:
    """Prepared shards of ``n`` generated galaxies under ``root``; their URI."""
    pictures, out = os.path.join(root, f"pictures-{n}"), os.path.join(root, f"shards-{n}")
    if os.path.exists(os.path.join(out, "manifest.json")):  # from an earlier run with this --workdir
        return out
    t0 = time.time()
    write_galaxies(pictures, n)
    prepare(PrepareConfig(input=pictures, output=out, image_size=SIZE, crop=1.0, dedupe=False))
    print(f"{n} galaxies generated and prepared in {time.time() - t0:.0f}s", flush=True)
    return out


def store_stats() -> tuple[int, int]:
    """(bytes in use in the object store now, bytes spilled so far) from the raylet."""
    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return int(reply.store_stats.object_store_bytes_used), int(reply.store_stats.spilled_bytes_total)


def one_epoch(uri: str) -> dict[str, float]:
    """Seconds to the first batch and to the end, images, peak store bytes and spilled bytes."""
    peak, stop = [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], store_stats()[0])
            time.sleep(0.2)

    spilled0 = store_stats()[1]
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0 = time.time()
    train, _, _ = load_datasets(uri, SIZE, 1.0, 0.1, cache="off", seed=0)
    first, n = None, 0
    for batch in train.iter_torch_batches(batch_size=BATCH, local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                                          local_shuffle_seed=0):
        first = first if first is not None else time.time() - t0
        n += batch["image"].shape[0]
    total = time.time() - t0
    stop.set()
    watcher.join()
    return {"first_batch_s": first, "epoch_s": total, "images": n, "peak_store_mib": peak[0] / 2**20,
            "spilled_mib": (store_stats()[1] - spilled0) / 2**20}


def compare(args: argparse.Namespace, uris: dict[int, str]) -> dict[int, list[dict[str, float]]]:
    """Alternating runs of every size in one Ray instance."""
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    quiet_ray()
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in uris}
    one_epoch(uris[min(uris)])  # warm-up: worker processes, imports
    for rep in range(args.repeats):
        for n, uri in uris.items():
            r = one_epoch(uri)
            runs[n].append(r)
            print(f"run {rep + 1}, {n} images: first batch {r['first_batch_s']:.2f}s, epoch {r['epoch_s']:.1f}s "
                  f"({r['images']} images), peak object store {r['peak_store_mib']:.0f} MiB", flush=True)
    ray.shutdown()
    return runs


def capped(uri: str, mib: int) -> dict[str, float]:
    """One epoch of ``uri`` in a fresh Ray with a ``mib`` MiB object store (run in a child process)."""
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", object_store_memory=mib * 2**20)
    quiet_ray()
    r = one_epoch(uri)
    ray.shutdown()
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2000,20000", help="numbers of galaxies, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per size")
    p.add_argument("--capped-mib", type=int, default=100, help="object store of the capped run (0: skip it)")
    p.add_argument("--workdir", default=None, help="where the shards go (default: a temporary folder)")
    p.add_argument("--child-capped", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_capped:
        print(json.dumps(capped(args.child_capped, args.capped_mib)))
        return
    root = args.workdir or tempfile.mkdtemp(prefix="streaming-scale-")
    sizes = [int(s) for s in args.sizes.split(",")]
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    quiet_ray()
    uris = {n: make_shards(root, n) for n in sizes}
    ray.shutdown()
    runs = compare(args, uris)
    small, large = min(sizes), max(sizes)
    mean = {n: {k: float(np.mean([r[k] for r in runs[n]])) for k in runs[n][0]} for n in sizes}
    print(f"time to first batch, {large} / {small} images: "
          f"{mean[large]['first_batch_s'] / mean[small]['first_batch_s']:.2f}x; peak object store "
          f"{mean[large]['peak_store_mib'] / max(mean[small]['peak_store_mib'], 1e-9):.2f}x "
          f"({mean[small]['peak_store_mib']:.0f} vs {mean[large]['peak_store_mib']:.0f} MiB)")
    if args.capped_mib:
        out = subprocess.run([sys.executable, __file__, "--child-capped", uris[large],
                              "--capped-mib", str(args.capped_mib)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        data_mib = r["images"] * SIZE * SIZE * 3 / 2**20
        print(f"capped object store {args.capped_mib} MiB: {r['images']} images ({data_mib:.0f} MiB decoded) "
              f"streamed in {r['epoch_s']:.1f}s, first batch {r['first_batch_s']:.2f}s, peak "
              f"{r['peak_store_mib']:.0f} MiB, spilled {r['spilled_mib']:.1f} MiB")
    print(json.dumps({"sizes": sizes, "mean": mean}, indent=1))


if __name__ == "__main__":
    main()
