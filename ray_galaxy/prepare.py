"""Prepare raw galaxy pictures into Parquet shards of fixed-size images (``jobs/prepare_data.py``).

Input: a folder or s3:// prefix of pictures as people collect them (mixed sizes and formats,
duplicates, broken files). Ray Data decodes each file with a guard, converts to RGB,
centre-crops, resizes and computes a perceptual hash; with ``dedupe`` near-duplicates (the same
galaxy re-encoded or resized) are dropped, keeping the first path in sorted order.

Output layout (local or s3://)::

    <output>/manifest.json              written last: the output is finished iff it exists
    <output>/shards-<run id>/*.parquet  columns: image (raw bytes of an (S, S, 3) uint8 array),
                                        path (relative to the input), hash, width, height

Re-running deletes the manifest first, writes a new shards folder, writes the manifest and only
then removes older shards folders, so a reader sees the old output, the new one, or "unfinished";
never a mix.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_galaxy.config import _h
from ray_galaxy.data import BadImage, DataError, decode_image, list_images, resolve_uri

MANIFEST = "manifest.json"
SHARDS_FORMAT = "ray-galaxy-shards/1"
COMPRESSIONS = ("zstd", "none", "lz4", "snappy")
HASH_BITS = 256
# Hamming distance (of 256 bits) at or below which two prepared images are the same galaxy.
# Measured on Galaxy Zoo 2 at 64px, crop 0.5: a re-encoded (JPEG q70) and resized copy differs
# by at most 22 bits, two different galaxies by at least 50 (400 images, 79,800 pairs).
DUPLICATE_BITS = 36


@dataclass
class PrepareConfig:
    """Settings of ``jobs/prepare_data.py``."""

    input: str = _h("Raw pictures: a folder or URI (s3://bucket/prefix), searched recursively.", default="")
    output: str = _h("Where the Parquet shards and manifest.json go (folder or URI).", default="")
    image_size: int = _h("Side of the square output images in pixels.", default=256)
    crop: float = _h("Central fraction kept before resizing (0.5 for Galaxy Zoo frames).", default=0.5)
    dedupe: bool = _h("Drop near-duplicates by perceptual hash.", default=False)
    min_size: int = _h("Pictures smaller than this on either side are dropped as too small.", default=32)
    rows_per_shard: int = _h("Images per Parquet file (more files: more parallel reads).", default=128)
    compression: str = _h("Parquet compression of the shards: zstd (default: reads ~9x faster than "
                          "decoding JPEGs, files ~0.55x of raw pixels), none (fastest to read, "
                          "largest), lz4 or snappy.", default="zstd")

    def __post_init__(self) -> None:
        from ray_galaxy.config import ConfigError

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


def perceptual_hash(image: np.ndarray) -> bytes:
    """256-bit DCT hash of an (S, S, 3) uint8 image (pHash with a 16x16 low-frequency block).

    Luminance is box-resized to 64x64, the 2-D DCT taken, and the 16x16 lowest frequencies
    (less the DC term, plus one padding bit) are thresholded at their median.
    """
    from PIL import Image
    from scipy.fft import dctn

    g = Image.fromarray(image).convert("L").resize((64, 64), Image.Resampling.BOX)
    d = dctn(np.asarray(g, dtype=np.float64), norm="ortho")[:16, :16].ravel()[1:]
    bits = np.append(d > np.median(d), False)
    return np.packbits(bits).tobytes()


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


class _Prepare:
    """Ray Data batch UDF: bytes -> prepared image, hash, original size, or an error reason."""

    def __init__(self, size: int, crop: float, min_size: int) -> None:
        self.size, self.crop, self.min_size = size, crop, min_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image
        import io

        n = len(batch["path"])
        images = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        hashes, errors, widths, heights = [], [], np.zeros(n, np.int32), np.zeros(n, np.int32)
        for i, raw in enumerate(batch["bytes"]):
            try:
                try:
                    w, h = Image.open(io.BytesIO(raw)).size
                except Exception:  # noqa: BLE001 - decode_image names the reason
                    w = h = 0
                if w and h and min(w, h) < self.min_size:
                    raise BadImage("too_small", f"{w}x{h} is below {self.min_size}px")
                images[i] = decode_image(raw, self.size, self.crop)
                widths[i], heights[i] = w, h
                hashes.append(perceptual_hash(images[i]).hex())
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


def _delete_dir(fs: Any, path: str) -> None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the preparation; returns the manifest it wrote."""
    import pyarrow.fs as pafs
    import ray

    t0 = time.time()
    paths = list_images(cfg.input)
    in_fs, in_root = resolve_uri(cfg.input)
    out_fs, out_root = resolve_uri(cfg.output)
    print(f"[ray-galaxy] preparing {len(paths)} files from {cfg.input} -> {cfg.output} "
          f"({cfg.image_size}px, crop {cfg.crop}, dedupe {'on' if cfg.dedupe else 'off'})", flush=True)
    ds = ray.data.read_binary_files(paths, filesystem=in_fs, include_paths=True)
    ds = ds.map_batches(_Prepare(cfg.image_size, cfg.crop, cfg.min_size), batch_size=32,
                        batch_format="numpy").materialize()
    meta = ds.select_columns(["path", "hash", "error"]).take_all()
    dropped: dict[str, int] = {}
    examples: list[str] = []
    good = [r for r in meta if not r["error"]]
    for r in meta:
        if r["error"]:
            reason = r["error"].split(":", 1)[0]
            dropped[reason] = dropped.get(reason, 0) + 1
            if len(examples) < 20:
                examples.append(f"{r['path']}: {r['error']}")
    good.sort(key=lambda r: r["path"])
    drop_paths: set[str] = set()
    if cfg.dedupe:
        dup_idx = find_duplicates([bytes.fromhex(r["hash"]) for r in good])
        drop_paths = {good[i]["path"] for i in dup_idx}
        if drop_paths:
            dropped["duplicate"] = len(drop_paths)
    keep = ds.filter(lambda r: not r["error"] and r["path"] not in drop_paths).drop_columns(["error"])

    # Relative paths: the split by path hash must not depend on the bucket or mount point.
    root = in_root.rstrip("/") + "/"
    keep = keep.map_batches(lambda b: {**b, "path": np.asarray(
        [p[len(root):] if p.startswith(root) else p for p in b["path"]], dtype=object)},
        batch_format="numpy")

    manifest_path = f"{out_root.rstrip('/')}/{MANIFEST}"
    out_fs.create_dir(out_root, recursive=True)
    if out_fs.get_file_info(manifest_path).type != pafs.FileType.NotFound:
        out_fs.delete_file(manifest_path)  # from here on the old output reads as unfinished
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    shard_dir = f"{out_root.rstrip('/')}/shards-{run_id}"
    n_written = keep.count()
    if n_written == 0:
        raise DataError(f"no usable images in {cfg.input}: dropped {dropped}")
    # Pixels barely compress, and Parquet's default (snappy, with a dictionary attempt per
    # value) made reading the shards slower than decoding the JPEGs: benchmarks/README.md.
    keep.repartition(max(1, -(-n_written // cfg.rows_per_shard))).write_parquet(
        shard_dir, filesystem=out_fs, compression=cfg.compression, use_dictionary=["path", "hash"])
    files = sorted(i.path for i in out_fs.get_file_info(pafs.FileSelector(shard_dir))
                   if i.path.endswith(".parquet"))
    manifest = {
        "format": SHARDS_FORMAT,
        "input": cfg.input,
        "image_size": cfg.image_size,
        "crop": cfg.crop,
        "dedupe": cfg.dedupe,
        "compression": cfg.compression,
        "duplicate_bits": DUPLICATE_BITS if cfg.dedupe else None,
        "read": len(meta),
        "written": n_written,
        "dropped": dropped,
        "dropped_examples": examples,
        "shards": [f[len(out_root.rstrip('/')) + 1:] for f in files],
        "seconds": round(time.time() - t0, 2),
    }
    with out_fs.open_output_stream(manifest_path) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    for info in out_fs.get_file_info(pafs.FileSelector(out_root)):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and name.startswith("shards-") and info.path != shard_dir:
            _delete_dir(out_fs, info.path)
    print(f"[ray-galaxy] read {manifest['read']}, wrote {n_written} images in {len(files)} shard(s), "
          f"dropped {dropped or 'none'} in {manifest['seconds']:.1f}s", flush=True)
    return manifest


# --------------------------------------------------------------------------- reading shards


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The manifest of a prepared output at ``uri``, or None if ``uri`` is not one."""
    import pyarrow.fs as pafs

    fs, root = resolve_uri(uri)
    path = f"{root.rstrip('/')}/{MANIFEST}"
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as f:
            manifest = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DataError(f"{uri}: {MANIFEST} is not valid JSON ({e})") from None
    # Other tools (and the built-in dataset cache) write manifest.json files too.
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDS_FORMAT:
        return None
    return manifest
