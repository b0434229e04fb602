"""Ingest images/s into a training loop: raw JPEG files against prepared Parquet shards.

The same images, read by Ray Data and iterated as torch batches the way a Train worker does,
(a) from the raw JPEGs (read bytes, decode, crop, resize every time) and (b) from shards
written once by jobs/prepare_data.py, for each ``--compressions`` value. Alternating runs
a, b, ..., a, b, ...; means reported.

    python benchmarks/ingest.py --input path/to/gz2/train --image-size 256 --crop 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402

from ray_galaxy.data import Resize, list_images, read_images, read_manifest, read_shards  # noqa: E402
from ray_galaxy.prepare import PrepareConfig, prepare  # noqa: E402
from ray_galaxy.runtime import ensure_ray  # noqa: E402
from ray_galaxy.storage import filesystem_of  # noqa: E402


def consume(ds, batch_size: int) -> float:
    """Images/s of iterating ``ds`` as torch batches to the end."""
    t0, n = time.time(), 0
    for batch in ds.iter_torch_batches(batch_size=batch_size, drop_last=False):
        n += batch["image"].shape[0]
    return n / (time.time() - t0)


def prepare_all(args: argparse.Namespace, compressions: list[str]
                ) -> tuple[dict[str, list[str]], dict[str, float], dict[str, float]]:
    """Shards of ``args.input`` once per compression: (files, seconds to prepare, megabytes)."""
    shard_files, prepare_s, shard_mb = {}, {}, {}
    for comp in compressions:
        out = tempfile.mkdtemp(prefix=f"rg-shards-{comp}-")
        t0 = time.time()
        prepare(PrepareConfig(input=args.input, output=out, image_size=args.image_size, crop=args.crop,
                              compression=comp))
        prepare_s[comp] = round(time.time() - t0, 1)
        shard_files[comp] = [os.path.join(out, s) for s in read_manifest(out)["shards"]]
        shard_mb[comp] = round(sum(os.path.getsize(f) for f in shard_files[comp]) / 1e6, 1)
    return shard_files, prepare_s, shard_mb


def main() -> None:
    """Prepare the shards, time both read paths alternately, print the result as JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a folder of galaxy images, e.g. Galaxy Zoo 2's train/")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--crop", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compressions", default="zstd,none", help="shard compressions to compare (default zstd,none)")
    args = p.parse_args()

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    compressions = args.compressions.split(",")
    shard_files, prepare_s, shard_mb = prepare_all(args, compressions)
    paths = list_images(args.input)
    fs = filesystem_of(args.input)
    jpeg_mb = round(sum(os.path.getsize(p) for p in paths) / 1e6, 1)

    def raw():
        return read_images(paths, fs, args.image_size, args.crop).select_columns(["image"])

    def shards(comp):
        # The read path training uses (data._load_prepared), minus its hash split.
        return read_shards(shard_files[comp], None, args.image_size, ("image",)).map_batches(
            Resize(args.image_size, 1.0, args.image_size), batch_size=64, batch_format="numpy")

    rates = {"raw_jpeg": [], **{f"shards_{c}": [] for c in compressions}}
    for _ in range(args.repeats):
        rates["raw_jpeg"].append(consume(raw(), args.batch_size))
        for c in compressions:
            rates[f"shards_{c}"].append(consume(shards(c), args.batch_size))
    mean = {k: sum(v) / len(v) for k, v in rates.items()}
    cpus = int(ray.cluster_resources().get("CPU", 0))
    result = {
        "images": len(paths), "image_size": args.image_size, "crop": args.crop,
        "physical_cores": os.cpu_count(), "ray_logical_cpus": cpus,
        "raw_jpeg_images_per_s": round(mean["raw_jpeg"], 1),
        **{f"shards_{c}_images_per_s": round(mean[f"shards_{c}"], 1) for c in compressions},
        **{f"ratio_shards_{c}_over_raw": round(mean[f"shards_{c}"] / mean["raw_jpeg"], 2) for c in compressions},
        "raw_images_per_s_per_core": round(mean["raw_jpeg"] / os.cpu_count(), 1),
        "runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "prepare_seconds_once": prepare_s,
        "megabytes": {"jpeg": jpeg_mb, **{f"shards_{c}": mb for c, mb in shard_mb.items()}},
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
