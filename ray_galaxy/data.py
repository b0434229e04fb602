"""Galaxy image data for training: listing, guarded decoding, crop/resize, split, Ray Data.

Images are read as bytes by Ray Data and decoded by Pillow inside a guard, so one unreadable
file is skipped and counted instead of failing the whole dataset (``ray.data.read_images``
would fail). Decoded images are uint8 arrays of shape (S, S, 3).

A source is a folder or URI of pictures, the built-in set's name (:mod:`ray_galaxy.builtin`)
or the output of ``jobs/prepare_data.py`` (:mod:`ray_galaxy.prepare` writes it; the shard
format, :data:`MANIFEST` and :func:`read_manifest`, is read here). The training datasets
themselves (streamed or cached, the train/val routing, the seeded epoch order) are built from
these readers by :mod:`ray_galaxy.streaming`.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from PIL import Image, ImageOps

from ray_galaxy.config import SOURCE_SEPARATOR
from ray_galaxy.storage import StorageError, join, resolve

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Decoded images smaller than this on either side carry no usable galaxy.
MIN_SOURCE_SIZE = 8
# Refuse to decode images above this many pixels (decompression bombs): 64 megapixels.
MAX_PIXELS = 64_000_000
# Prepared shards (jobs/prepare_data.py): <output>/manifest.json, written last, names the shards.
MANIFEST = "manifest.json"
SHARDS_FORMAT = "ray-galaxy-shards/1"


class DataError(RuntimeError):
    """A data source cannot be used; the message says which and why."""


class BadImage(ValueError):
    """One file is not a usable image; ``reason`` is a short category for the counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --------------------------------------------------------------------------- decoding


def center_crop_resize(img: Image.Image, size: int, crop: float = 1.0) -> Image.Image:
    """Keep the central ``crop`` fraction of the largest centred square, resize to size x size."""
    w, h = img.size
    side = min(w, h) * crop
    left, top = (w - side) / 2, (h - side) / 2
    box = (round(left), round(top), round(left + side), round(top + side))
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def decode_image(data: bytes, size: int, crop: float = 1.0) -> np.ndarray:
    """Bytes of any Pillow-readable image -> (size, size, 3) uint8 RGB; raises :class:`BadImage`."""
    if not data:
        raise BadImage("unreadable", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            out = _decode_guarded(data, size, crop)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure means "not an image"
        raise BadImage("unreadable", f"{type(e).__name__}: {e}") from None
    arr = np.asarray(out, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise BadImage("unreadable", f"unexpected decoded shape {arr.shape}")
    return arr


def _decode_guarded(data: bytes, size: int, crop: float) -> Image.Image:
    """The decode itself; the size checks read only the header, before any pixel is decoded."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise BadImage("too_large", f"{w}x{h} exceeds {MAX_PIXELS} pixels")
    if min(w, h) < MIN_SOURCE_SIZE:
        raise BadImage("too_small", f"{w}x{h}")
    # JPEG draft mode decodes at a reduced scale directly: much cheaper than a full
    # decode followed by a downscale.
    if img.format == "JPEG":
        need = int(np.ceil(size / crop))
        img.draft("RGB", (need, need))
    img.load()
    img = ImageOps.exif_transpose(img)
    return center_crop_resize(_to_rgb(img), size, crop)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB; 16-bit and float images are rescaled to 8 bits, alpha is flattened on black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        scaled = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(np.nan_to_num(scaled).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


# --------------------------------------------------------------------------- listing and split


def _entries(uri: str) -> list[pafs.FileInfo]:
    """The file (or every entry below the folder) at ``uri``; DataError when it cannot be read."""
    try:
        fs, root = resolve(uri)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data source {uri!r} does not exist")
        if info.type == pafs.FileType.File:
            return [info]
        return fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except DataError:
        raise
    except StorageError as e:
        raise DataError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises OSError and others for an unreachable store
        raise DataError(f"cannot list {uri!r}: {e}") from None


def list_images(uri: str) -> list[str]:
    """All image files under ``uri`` (recursive), sorted; paths are in the filesystem's terms."""
    entries = _entries(uri)
    paths = sorted(
        e.path for e in entries
        if e.type == pafs.FileType.File and e.path.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        if any(e.path.endswith(".parquet") for e in entries):
            raise DataError(
                f"{uri!r} holds Parquet shards but no manifest.json: an unfinished "
                "jobs/prepare_data.py output; run it again")
        raise DataError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {uri!r}"
        )
    return paths


def data_sources(data: str) -> list[str]:
    """The sources one data setting names: a folder, URI, prepared output or built-in name, or
    several of them joined by commas (``path/to/gz2/train,path/to/gz2/extra``; a YAML list is
    joined so by the config loader). Raises a :class:`DataError` for an empty or repeated one."""
    parts = [p.strip() for p in str(data).split(SOURCE_SEPARATOR)]
    if any(not p for p in parts):
        raise DataError(f"data {data!r} names an empty source (sources are separated by {SOURCE_SEPARATOR!r})")
    if len(set(parts)) != len(parts):
        raise DataError(f"data {data!r} names a source twice")
    return parts


def list_sources(uris: list[str]) -> tuple[Any, dict[str, str]]:
    """Every image file under each of ``uris`` (folders or URIs of pictures, on one filesystem):
    (the filesystem, {path: its path relative to the source it is under}). The relative path is
    what the train/val split hashes, so a folder keeps its split whatever it is read beside."""
    filesystem, found = None, {}
    for uri in uris:
        fs, root = resolve(uri)
        if filesystem is not None and not fs.equals(filesystem):
            raise DataError(f"data sources {', '.join(map(repr, uris))} are on different filesystems; read "
                            "them from one place (copy them, or jobs/prepare_data.py each into one store)")
        filesystem = filesystem or fs
        prefix = root.rstrip("/") + "/"
        for p in list_images(uri):
            found.setdefault(p, p[len(prefix):] if p.startswith(prefix) else p)
    return filesystem, found


def split_paths(paths: list[str], val_fraction: float, root: str = "",
                relative: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Deterministic train/val split by a hash of each path relative to ``root`` (or as given by
    ``relative``, for paths under several sources: :func:`list_sources`).

    A file stays on the same side whatever else is added to the folder, and wherever the
    folder is mounted or copied (hence the relative path).
    """
    train, val = [], []
    for p in paths:
        if relative is not None:
            rel = relative[p]
        else:
            rel = p[len(root):].lstrip("/") if root and p.startswith(root) else p
        (val if is_val(rel, val_fraction) else train).append(p)
    if paths and not val:  # tiny sets: keep at least one validation image
        val.append(train.pop())
    return train, val


def split_key(rel_path: str) -> float:
    """A (root-relative) path's place in [0, 1) for the split: validation iff below val_fraction.

    Prepared shards are written in this key's order, so a shard's key range tells its split
    without reading it (:func:`shard_splits`)."""
    return int.from_bytes(hashlib.sha1(rel_path.encode()).digest()[:8], "big") / 2**64


def is_val(rel_path: str, val_fraction: float) -> bool:
    """Whether a (root-relative) path falls in the validation split."""
    return split_key(rel_path) < val_fraction


# --------------------------------------------------------------------------- prepared shards


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The manifest of a prepared output at ``uri``, or None if ``uri`` is not one."""
    try:
        fs, root = resolve(uri)
    except StorageError as e:
        raise DataError(str(e)) from None
    path = join(root, MANIFEST)
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as f:
            manifest = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DataError(f"{uri}: {MANIFEST} is not valid JSON ({e})") from None
    except OSError as e:  # an unreachable or refusing store
        raise DataError(f"cannot read {uri!r}: {e}") from None
    # Other tools (and the built-in dataset cache) write manifest.json files too.
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDS_FORMAT:
        return None
    return manifest


def shard_images(values: Any, stored_size: int) -> np.ndarray:
    """A shard's ``image`` column (raw bytes per row) -> (N, S, S, 3) uint8."""
    return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(-1, stored_size, stored_size, 3)


def resize_images(images: np.ndarray, size: int, crop: float = 1.0) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, size, size, 3): central ``crop`` kept, resized; unchanged if already so."""
    if images.shape[1] == size and crop == 1.0:
        return images
    return np.stack([np.asarray(center_crop_resize(Image.fromarray(im), size, crop)) for im in images]
                    ) if len(images) else np.zeros((0, size, size, 3), np.uint8)


class _ParseShards:
    """Ray Data batch UDF: whole Parquet shard files (their bytes) -> rows of uint8 images.

    Reading the files as bytes and parsing them here is ~4x faster than ``read_parquet`` for
    these shards (a few large binary values per row; docs/benchmarks-history.md, "Ingest")."""

    def __init__(self, stored_size: int, columns: tuple[str, ...] = ("image", "path"),
                 resize: "Resize | None" = None) -> None:
        self.stored, self.columns, self.resize = stored_size, columns, resize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {c: [] for c in self.columns}
        for blob in batch["bytes"]:
            table = pq.read_table(pa.BufferReader(blob), columns=list(self.columns))
            for c in self.columns:
                values = table.column(c).to_numpy(zero_copy_only=False)
                out[c].append(shard_images(values, self.stored) if c == "image" else values)
        rows = {c: np.concatenate(v) for c, v in out.items()}
        if self.resize is not None:
            rows["image"] = self.resize(rows)["image"]
        return rows


class Resize:
    """Ray Data batch UDF: shard images (raw bytes or uint8 arrays) -> uint8 images,
    cropped/resized to the training size."""

    def __init__(self, size: int, crop: float, stored_size: int) -> None:
        self.size, self.crop, self.stored = size, crop, stored_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        imgs = batch["image"]
        if imgs.dtype == object:
            imgs = shard_images(imgs, self.stored)
        return {"image": resize_images(imgs, self.size, self.crop)}


def read_shards(files: list[str], filesystem: Any, stored_size: int,
                columns: tuple[str, ...] = ("image", "path"), shuffle: Any = None,
                resize: "Resize | None" = None) -> ray.data.Dataset:
    """A dataset of the rows of prepared shard files: ``image`` as (S, S, 3) uint8, ``path``.

    One read task per shard (the unit a streamed epoch is shuffled and scheduled in);
    ``shuffle`` is ``read_binary_files``' file-order shuffle (a ``FileShuffleConfig``).
    ``resize`` (a :class:`Resize`) runs in the same task as the parsing: as a separate
    ``map_batches`` of another batch size it is not fused with the read, and Ray Data then
    read most shards before resizing any, so the first batch of a streamed epoch waited for
    a share of the whole data set (8-12 s for 20,000 images against 1 s for 2,000;
    docs/benchmarks-history.md, "Streaming cost against data size").

    ``batch_size=None`` (the whole read block: one file) keeps the parse fused with the read:
    with a batch size Ray Data will not fuse a map into the read before it, and every shard's
    raw bytes then waited in the object store for the parse (a third of an 80 MB store
    streaming 128 px shards, which spilled; docs/data.md, "Under memory pressure")."""
    return ray.data.read_binary_files(files, filesystem=filesystem, shuffle=shuffle,
                                      override_num_blocks=len(files)).map_batches(
        _ParseShards(stored_size, columns, resize), batch_size=None, batch_format="numpy")


def shard_splits(manifest: dict[str, Any], val_fraction: float) -> dict[str, list[int]] | None:
    """Indices of the manifest's shards wholly in train, wholly in val, and "mixed" (at most one).

    Shards are written in :func:`split_key` order with each shard's key range in the manifest
    (``split_keys``), so the split is known per shard without reading any. None for a manifest
    written before that (each of its shards holds rows of both splits).
    """
    ranges = manifest.get("split_keys")
    if not isinstance(ranges, list) or len(ranges) != len(manifest["shards"]):
        return None
    out: dict[str, list[int]] = {"train": [], "val": [], "mixed": []}
    for i, (lo, hi) in enumerate(ranges):
        side = "val" if hi < val_fraction else "train" if lo >= val_fraction else "mixed"
        out[side].append(i)
    return out


# --------------------------------------------------------------------------- Ray Data


class _Decode:
    """Ray Data batch UDF: bytes -> image rows, with an ``error`` column instead of raising."""

    def __init__(self, size: int, crop: float) -> None:
        self.size, self.crop = size, crop

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        images = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        errors = []
        for i, raw in enumerate(batch["bytes"]):
            try:
                images[i] = decode_image(raw, self.size, self.crop)
                errors.append("")
            except BadImage as e:
                errors.append(str(e))
        return {"image": images, "path": np.asarray(batch["path"], dtype=object),
                "error": np.asarray(errors, dtype=object)}


def read_images(paths: list[str], filesystem: Any, size: int, crop: float, shuffle: Any = None,
                blocks: int | None = None) -> ray.data.Dataset:
    """Lazy Ray dataset of decoded images with columns image, path, error ('' when good).

    ``shuffle`` is ``read_binary_files``' file-order shuffle (a ``FileShuffleConfig``);
    ``blocks`` fixes the number of read tasks (else Ray picks it from the cluster's size)."""
    ds = ray.data.read_binary_files(paths, filesystem=filesystem, include_paths=True,
                                    ignore_missing_paths=False, shuffle=shuffle,
                                    override_num_blocks=blocks)
    return ds.map_batches(_Decode(size, crop), batch_size=64, batch_format="numpy")
