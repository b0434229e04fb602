"""Prepare raw galaxy pictures into Parquet shards of fixed-size images (``jobs/prepare_data.py``).

Input: a folder or s3:// prefix of pictures as people collect them (mixed sizes and formats,
duplicates, broken files). Ray Data decodes each file with a guard, converts to RGB,
centre-crops, resizes and computes a perceptual hash of the cropped picture (at a fixed
:data:`HASH_SIZE`, so whatever ``image_size``); with ``dedupe`` near-duplicates (the same galaxy
re-encoded or resized) are dropped, keeping the first path in sorted order.

Output layout (local or s3://)::

    <output>/manifest.json              written last: the output is finished iff it exists
    <output>/shards-<run id>/*.parquet  columns: image (raw bytes of an (S, S, 3) uint8 array),
                                        path (relative to the input), hash, width, height, and
                                        with ``labels`` a CSV: label (the class, null if none)

Files are read and shards written in the order of the train/val split key of each path
(:func:`ray_galaxy.data.split_key`), about ``rows_per_shard`` rows each; the manifest records each
shard's rows and key range, so training knows which shards are train or val without reading
them (:func:`ray_galaxy.data.shard_splits`).

Re-running deletes the manifest first, writes a new shards folder, writes the manifest and only
then removes older shards folders, so a reader sees the old output, the new one, or "unfinished";
never a mix. The shard format itself (:data:`ray_galaxy.data.MANIFEST`,
:func:`ray_galaxy.data.read_manifest`) belongs to the data layer, which training reads it with.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from PIL import Image
from scipy.fft import dctn

from ray_galaxy.config import ConfigError, _h
from ray_galaxy.console import log
from ray_galaxy.data import (MANIFEST, SHARDS_FORMAT, BadImage, DataError, data_sources, decode_image, list_sources,
                             split_key)
from ray_galaxy.labels import LabelTable, describe_labels, label_counts, label_of, labels_for, read_labels
from ray_galaxy.storage import absolute, join, resolve

COMPRESSIONS = ("zstd", "none", "lz4", "snappy")
HASH_BITS = 256
# Side of the thumbnail of the cropped picture that every hash is taken from. Fixed, not the
# output size: hashed at a 32px output a re-encoded copy was 38 bits from its original, at 64px
# 14, so whether a pair counted as duplicates depended on --image-size.
HASH_SIZE = 64
# Names the hash in the manifest: hashes are comparable only between outputs with the same one.
HASH_FORMAT = f"dct{HASH_BITS}-crop{HASH_SIZE}px"
# Hamming distance (of 256 bits) at or below which two pictures are the same galaxy. Measured on
# Galaxy Zoo 2 (2,000 images, 2.0M pairs, crop 0.5): a copy resized to 150-600px and re-encoded
# as JPEG q50-80 differs from its original by at most 26 bits; two different galaxies by at
# least 40 (one pair of look-alike smooth ellipticals; the next closest pair is 50 apart).
DUPLICATE_BITS = 36


@dataclass
class PrepareConfig:
    """Settings of ``jobs/prepare_data.py``."""

    input: str = _h("Raw pictures: a folder or URI (s3://bucket/prefix), searched recursively; several joined by "
                    "commas (a list in YAML) are prepared into one output.", default="")
    output: str = _h("Where the Parquet shards and manifest.json go (folder or URI).", default="")
    image_size: int = _h("Side of the square output images in pixels.", default=256)
    crop: float = _h("Central fraction kept before resizing (0.5 for Galaxy Zoo frames).", default=0.5)
    dedupe: bool = _h("Drop near-duplicates by perceptual hash.", default=False)
    min_size: int = _h("Pictures smaller than this on either side are dropped as too small.", default=32)
    rows_per_shard: int = _h("Images per Parquet file (more files: more parallel reads).", default=128)
    compression: str = _h("Parquet compression of the shards: zstd (default: reads ~9x faster than "
                          "decoding JPEGs, files ~0.55x of raw pixels), none (fastest to read, "
                          "largest), lz4 or snappy.", default="zstd")
    labels: str | None = _h("CSV of class labels (key: file name or stem; class: the column named label, "
                            "class or morphology, else the last): each image's class is stored in the shards' "
                            "label column, so training and jobs/fit_sampler.py need no CSV.", default=None)

    def __post_init__(self) -> None:
        if not self.input or not self.output:
            raise ConfigError("both --input and --output are required")
        if not 8 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be in 8..1024, got {self.image_size}")
        if not 0 < self.crop <= 1:
            raise ConfigError(f"crop must be in (0, 1], got {self.crop}")
        if self.rows_per_shard < 1 or self.min_size < 1:
            raise ConfigError("rows_per_shard and min_size must be >= 1")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"compression must be one of {', '.join(COMPRESSIONS)}; got {self.compression!r}")


# --------------------------------------------------------------------------- perceptual hash


def perceptual_hash(thumbnail: np.ndarray) -> bytes:
    """256-bit DCT hash (pHash with a 16x16 low-frequency block) of a HASH_SIZE thumbnail.

    The 2-D DCT of the (HASH_SIZE, HASH_SIZE, 3) uint8 thumbnail's luminance is taken, and its
    16x16 lowest frequencies (less the DC term, plus one padding bit) thresholded at their median.
    """
    if thumbnail.shape[:2] != (HASH_SIZE, HASH_SIZE):
        raise ValueError(f"perceptual_hash takes a {HASH_SIZE}x{HASH_SIZE} thumbnail (hashes of other "
                         f"sizes do not compare), got {thumbnail.shape}; see file_hash")
    g = Image.fromarray(thumbnail).convert("L")
    d = dctn(np.asarray(g, dtype=np.float64), norm="ortho")[:16, :16].ravel()[1:]
    bits = np.append(d > np.median(d), False)
    return np.packbits(bits).tobytes()


def file_hash(data: bytes, crop: float) -> bytes:
    """Perceptual hash of a picture file: of its central ``crop`` resized to HASH_SIZE (bicubic,
    antialiased), so the same whatever size the prepared images have. Raises BadImage."""
    return perceptual_hash(decode_image(data, HASH_SIZE, crop))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distances between rows of packed hashes a (n, 32) and b (m, 32) -> (n, m)."""
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.unpackbits(x, axis=-1).sum(-1)


def find_duplicates(hashes: list[bytes], threshold: int = DUPLICATE_BITS, block: int = 512) -> list[int]:
    """Indices to drop: each image within ``threshold`` bits of an earlier kept one.

    Blocked all-pairs comparison: exact, and fast enough for tens of thousands of images.
    """
    if not hashes:
        return []
    h = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), -1)
    dropped = np.zeros(len(h), dtype=bool)
    for start in range(0, len(h), block):
        rows = np.arange(start, min(start + block, len(h)))
        d = hamming(h[rows], h[: rows[-1] + 1])
        for k, i in enumerate(rows):
            earlier = np.nonzero(d[k, :i] <= threshold)[0]
            if any(not dropped[j] for j in earlier):
                dropped[i] = True
    return [int(i) for i in np.nonzero(dropped)[0]]


# --------------------------------------------------------------------------- Ray Data step


def _header_size(raw: bytes) -> tuple[int, int]:
    """(width, height) from the header, or (0, 0) when unreadable (decode_image names why)."""
    try:
        return Image.open(io.BytesIO(raw)).size
    except Exception:  # noqa: BLE001 - any failure here is reported by decode_image
        return 0, 0


def prepare_image(data: bytes, size: int, crop: float,
                  min_size: int) -> tuple[np.ndarray, bytes, int, int]:
    """One picture file -> (prepared (size, size, 3) image, :func:`file_hash`, width, height).

    Raises BadImage (reason ``too_small`` below ``min_size``, or why it cannot be decoded).
    """
    w, h = _header_size(data)
    if w and h and min(w, h) < min_size:
        raise BadImage("too_small", f"{w}x{h} is below {min_size}px")
    image = decode_image(data, size, crop)
    # The same decode as file_hash makes at HASH_SIZE: reuse it rather than decode twice.
    digest = perceptual_hash(image) if size == HASH_SIZE else file_hash(data, crop)
    return image, digest, w, h


class _Prepare:
    """Ray Data batch UDF: bytes -> prepared image, hash, original size, or an error reason."""

    def __init__(self, size: int, crop: float, min_size: int) -> None:
        self.size, self.crop, self.min_size = size, crop, min_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        images = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        hashes, errors, widths, heights = [], [], np.zeros(n, np.int32), np.zeros(n, np.int32)
        for i, raw in enumerate(batch["bytes"]):
            try:
                images[i], digest, widths[i], heights[i] = prepare_image(
                    raw, self.size, self.crop, self.min_size)
                hashes.append(digest.hex())
                errors.append("")
            except BadImage as e:
                hashes.append("")
                errors.append(str(e))
        # Raw bytes, not a tensor column: Parquet decodes a list<uint8> value by value (about
        # 100 images/s here), a binary column is one memcpy per image.
        return {"image": np.asarray([im.tobytes() for im in images], dtype=object),
                "path": np.asarray(batch["path"], dtype=object),
                "hash": np.asarray(hashes, dtype=object), "width": widths, "height": heights,
                "error": np.asarray(errors, dtype=object)}


def _count_dropped(meta: list[dict[str, Any]]) -> tuple[dict[str, int], list[str]]:
    """Dropped files by reason, and up to 20 examples, from the rows' ``error`` column."""
    dropped: dict[str, int] = {}
    examples: list[str] = []
    for r in meta:
        if r["error"]:
            reason = r["error"].split(":", 1)[0]
            dropped[reason] = dropped.get(reason, 0) + 1
            if len(examples) < 20:
                examples.append(f"{r['path']}: {r['error']}")
    return dropped, examples


def _duplicate_paths(meta: list[dict[str, Any]]) -> set[str]:
    """Paths of near-duplicates among the good rows; the first in sorted path order is kept."""
    good = sorted((r for r in meta if not r["error"]), key=lambda r: r["path"])
    return {good[i]["path"] for i in find_duplicates([bytes.fromhex(r["hash"]) for r in good])}


def _with_labels(ds: ray.data.Dataset, table: LabelTable) -> ray.data.Dataset:
    """Add each row's class (null when its file has none) as a ``label`` column."""
    return ds.map_batches(lambda t: t.append_column("label", pa.array(
        [label_of(p, table) for p in t["path"].to_pylist()], pa.string())), batch_format="pyarrow")


def _relative_paths(ds: ray.data.Dataset, relative: dict[str, str]) -> ray.data.Dataset:
    """Paths relative to the input each came from (:func:`ray_galaxy.data.list_sources`): the
    split by path hash must not depend on the bucket or mount."""
    return ds.map_batches(lambda b: {**b, "path": np.asarray([relative[p] for p in b["path"]], dtype=object)},
                          batch_format="numpy")


# --------------------------------------------------------------------------- output folder


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _start_output(fs: pafs.FileSystem, out_root: str) -> str:
    """Mark the output unfinished (its manifest removed); returns this run's new shards folder."""
    fs.create_dir(out_root, recursive=True)
    manifest_path = join(out_root, MANIFEST)
    if fs.get_file_info(manifest_path).type != pafs.FileType.NotFound:
        fs.delete_file(manifest_path)  # from here on the old output reads as unfinished
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    return join(out_root, f"shards-{run_id}")


def _write_shard(table: pa.Table, shard_uri: str, compression: str) -> pa.Table:
    """Ray Data batch UDF: write one block of rows, in split-key order, as a Parquet file in
    ``shard_uri`` named by its first key (so names sort in key order); returns what the manifest
    records of it."""
    keys = np.asarray([split_key(p) for p in table["path"].to_pylist()], dtype=np.float64)
    order = np.argsort(keys)
    keys = keys[order]
    fs, folder = resolve(shard_uri)
    name = f"part-{int(keys[0] * 2**64):016x}.parquet"
    # Pixels barely compress, and Parquet's default (snappy, with a dictionary attempt per
    # value) made reading the shards slower than decoding the JPEGs: docs/benchmarks-history.md.
    pq.write_table(table.take(pa.array(order)), join(folder, name), filesystem=fs,
                   compression=compression, use_dictionary=[c for c in ("path", "hash", "label")
                                                            if c in table.column_names])
    return pa.table({"name": [name], "rows": [len(keys)], "lo": [float(keys[0])], "hi": [float(keys[-1])]})


def _write_shards(ds: ray.data.Dataset, n_rows: int, fs: pafs.FileSystem, shard_dir: str,
                  cfg: PrepareConfig) -> list[dict[str, Any]]:
    """Write ``ds`` (rows in split-key order: :func:`_in_split_order`) as Parquet files of about
    ``rows_per_shard`` rows; returns per shard, in key order: its ``path``, ``rows`` and key
    range ``lo``..``hi``.

    Consecutive rows make a shard, so each holds one range of the key and training tells from
    the manifest which shards are train, which val, and which one holds both, without reading
    any. Ordered blocks split without a shuffle (a sort or group-by here cost 2-3x as much)."""
    ds.context.execution_options.preserve_order = True
    uri = join(absolute(cfg.output), shard_dir.rstrip("/").rsplit("/", 1)[-1])
    fs.create_dir(shard_dir, recursive=True)
    written = ds.repartition(max(1, -(-n_rows // cfg.rows_per_shard))).map_batches(
        _write_shard, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"shard_uri": uri, "compression": cfg.compression}).take_all()
    return [{**r, "path": join(shard_dir, r["name"])} for r in sorted(written, key=lambda r: r["lo"])]


def split_manifest(shards: list[dict[str, Any]], out_root: str) -> dict[str, Any]:
    """The manifest's shard entries: names (relative to the output), rows and split-key ranges,
    in key order (:func:`ray_galaxy.data.shard_splits` reads them)."""
    return {"shards": [s["path"][len(out_root.rstrip("/")) + 1:] for s in shards],
            "shard_rows": [int(s["rows"]) for s in shards],
            "split_keys": [[s["lo"], s["hi"]] for s in shards]}


def _publish(fs: pafs.FileSystem, out_root: str, shard_dir: str, manifest: dict[str, Any]) -> None:
    """Write the manifest (the output is now finished), then remove older shards folders."""
    with fs.open_output_stream(join(out_root, MANIFEST)) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    for info in fs.get_file_info(pafs.FileSelector(out_root)):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and name.startswith("shards-") and info.path != shard_dir:
            _delete_dir(fs, info.path)


def _labels_entry(meta: list[dict[str, Any]], drop_paths: set[str], table: LabelTable) -> dict[str, Any]:
    """The manifest's ``labels``: the CSV, the classes and images per class of the kept images."""
    kept = [r["path"] for r in meta if not r["error"] and r["path"] not in drop_paths]
    labels = labels_for(kept, table)
    log(describe_labels(labels, table.source))
    counts = label_counts(labels)
    return {"source": table.source, "classes": list(counts), "counts": counts,
            "unlabelled": sum(label is None for label in labels)}


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the preparation; returns the manifest it wrote."""
    t0 = time.time()
    in_fs, relative = list_sources(data_sources(cfg.input))
    paths = sorted(relative)
    out_fs, out_root = resolve(cfg.output)
    table = read_labels(cfg.labels) if cfg.labels else None  # a bad CSV fails before any image is read
    log(f"preparing {len(paths)} files from {cfg.input} -> {cfg.output} "
        f"({cfg.image_size}px, crop {cfg.crop}, dedupe {'on' if cfg.dedupe else 'off'})")
    # Read in split-key order, kept in order: consecutive rows then make each shard (_write_shards).
    ds = ray.data.read_binary_files(sorted(paths, key=lambda p: split_key(relative[p])), filesystem=in_fs,
                                    include_paths=True)
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(_Prepare(cfg.image_size, cfg.crop, cfg.min_size), batch_size=32,
                        batch_format="numpy").materialize()
    meta = ds.select_columns(["path", "hash", "error"]).take_all()
    dropped, examples = _count_dropped(meta)
    drop_paths = _duplicate_paths(meta) if cfg.dedupe else set()
    if drop_paths:
        dropped["duplicate"] = len(drop_paths)
    keep = ds.filter(lambda r: not r["error"] and r["path"] not in drop_paths).drop_columns(["error"])
    keep = _relative_paths(keep, relative)
    labels = _labels_entry(meta, drop_paths, table) if table is not None else None
    if table is not None:
        keep = _with_labels(keep, table)

    shard_dir = _start_output(out_fs, out_root)
    n_written = keep.count()
    if n_written == 0:
        raise DataError(f"no usable images in {cfg.input}: dropped {dropped}")
    shards = _write_shards(keep, n_written, out_fs, shard_dir, cfg)
    manifest = {
        "format": SHARDS_FORMAT,
        "input": cfg.input,
        "image_size": cfg.image_size,
        "crop": cfg.crop,
        "dedupe": cfg.dedupe,
        "compression": cfg.compression,
        "hash": HASH_FORMAT,
        "duplicate_bits": DUPLICATE_BITS if cfg.dedupe else None,
        "read": len(meta),
        "written": n_written,
        "dropped": dropped,
        "dropped_examples": examples,
        **split_manifest(shards, out_root),
        **({"labels": labels} if labels else {}),
        "seconds": round(time.time() - t0, 2),
    }
    _publish(out_fs, out_root, shard_dir, manifest)
    log(f"read {manifest['read']}, wrote {n_written} images in {len(shards)} shard(s), "
        f"dropped {dropped or 'none'} in {manifest['seconds']:.1f}s")
    return manifest
