"""Ingest images/s into a training loop: raw JPEG files against prepared Parquet shards.

The same images, read by Ray Data and iterated as torch batches the way a Train worker does,
(a) from the raw JPEGs (read bytes, decode, crop, resize every time) and (b) from shards
written once by jobs/prepare_data.py, for each ``--compressions`` value. Alternating runs
a, b, ..., a, b, ...; means reported.

    python benchmarks/ingest.py --input path/to/gz2/train --image-size 256 --crop 0.5 --profile

``--profile`` also times each stage of both paths per image in one thread (read bytes; JPEG
decode, crop + resize, to array; shard parse, bytes to array; batch to torch), and the Ray Data
pipeline alone: tasks that emit ready-made rows of the same size, iterated the same way.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ray_galaxy.data import (Resize, center_crop_resize, list_images, read_images, read_manifest,  # noqa: E402
                             read_shards, shard_images)
from ray_galaxy.prepare import PrepareConfig, prepare  # noqa: E402
from ray_galaxy.runtime import ensure_ray  # noqa: E402
from ray_galaxy.storage import filesystem_of  # noqa: E402


def consume(ds, batch_size: int) -> float:
    """Images/s of iterating ``ds`` as torch batches to the end."""
    t0, n = time.time(), 0
    for batch in ds.iter_torch_batches(batch_size=batch_size, drop_last=False):
        n += batch["image"].shape[0]
    return n / (time.time() - t0)


def _timed(acc: dict[str, float], stage: str, fn, *args):
    """``fn(*args)``, its seconds added to ``acc[stage]``."""
    t0 = time.perf_counter()
    out = fn(*args)
    acc[stage] = acc.get(stage, 0.0) + time.perf_counter() - t0
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _decode(data: bytes, size: int, crop: float) -> Image.Image:
    """The JPEG decode of ``ray_galaxy.data.decode_image`` (draft mode at the needed scale)."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (int(np.ceil(size / crop)),) * 2)
    img.load()
    return img.convert("RGB")


def stage_profile(paths: list[str], files: list[str], size: int, crop: float, batch: int) -> dict:
    """Milliseconds per image of each stage of both read paths, in this one thread."""
    raw: dict[str, float] = {}
    images = []
    for path in paths:
        img = _timed(raw, "decode", _decode, _timed(raw, "read_bytes", _read, path), size, crop)
        img = _timed(raw, "crop_resize", center_crop_resize, img, size, crop)
        images.append(_timed(raw, "to_array", np.asarray, img))
    for i in range(0, len(images), batch):
        _timed(raw, "batch_to_torch", lambda b: torch.as_tensor(np.stack(b)), images[i:i + batch])
    shard: dict[str, float] = {}
    n = 0
    for path in files:
        blob = _timed(shard, "read_bytes", _read, path)
        column = _timed(shard, "parse_parquet", lambda b: pq.read_table(pa.BufferReader(b), columns=["image"])
                        .column("image").to_numpy(zero_copy_only=False), blob)
        arr = _timed(shard, "bytes_to_array", shard_images, column, size)
        for i in range(0, len(arr), batch):
            _timed(shard, "batch_to_torch", lambda b: torch.as_tensor(b).clone(), arr[i:i + batch])
        n += len(arr)
    per_image = {"raw_jpeg": {k: v * 1000 / len(paths) for k, v in raw.items()},
                 "shards": {k: v * 1000 / n for k, v in shard.items()}}
    for stages in per_image.values():
        stages["total"] = sum(stages.values())
    return {k: {s: round(v, 3) for s, v in stages.items()} for k, stages in per_image.items()}


def _blank_rows(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    return {"image": np.full((len(batch["id"]), size, size, 3), 7, np.uint8)}


def ray_data_only(n: int, size: int, blocks: int, batch_size: int) -> float:
    """Images/s of Ray Data alone: ``blocks`` tasks emit ``n`` ready (size, size, 3) rows,
    iterated as torch batches; the transport every ingest path pays on top of its own work."""
    ds = ray.data.range(n, override_num_blocks=blocks).map_batches(
        _blank_rows, fn_kwargs={"size": size}, batch_size=64, batch_format="numpy")
    return consume(ds, batch_size)


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
    p.add_argument("--profile", action="store_true", help="also time each stage per image, and Ray Data alone")
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
        # The read path streamed training uses (ray_galaxy.streaming), resize fused into the parse.
        return read_shards(shard_files[comp], None, args.image_size, ("image",),
                           resize=Resize(args.image_size, 1.0, args.image_size))

    rates = {"raw_jpeg": [], **{f"shards_{c}": [] for c in compressions}}
    if args.profile:
        rates["ray_data_only"] = []
    for _ in range(args.repeats):
        rates["raw_jpeg"].append(consume(raw(), args.batch_size))
        for c in compressions:
            rates[f"shards_{c}"].append(consume(shards(c), args.batch_size))
        if args.profile:
            rates["ray_data_only"].append(ray_data_only(len(paths), args.image_size,
                                                        len(shard_files[compressions[0]]), args.batch_size))
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
    if args.profile:
        result["ray_data_only_images_per_s"] = round(mean["ray_data_only"], 1)
        result["ms_per_image_one_thread"] = stage_profile(paths, shard_files[compressions[0]], args.image_size,
                                                          args.crop, args.batch_size)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
