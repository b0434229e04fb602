"""Galaxy image data: listing, guarded decoding, crop/resize, split, augmentation, Ray Data.

Images are read as bytes by Ray Data and decoded by Pillow inside a guard, so one unreadable
file is skipped and counted instead of failing the whole dataset (``ray.data.read_images``
would fail). Decoded images are uint8 arrays of shape (S, S, 3).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BUILTIN_DATASETS = ("hubble-xdf",)
# Decoded images smaller than this on either side carry no usable galaxy.
MIN_SOURCE_SIZE = 8
# Refuse to decode images above this many pixels (decompression bombs): 64 megapixels.
MAX_PIXELS = 64_000_000


class DataError(RuntimeError):
    """A data source cannot be used; the message says which and why."""


class BadImage(ValueError):
    """One file is not a usable image; ``reason`` is a short category for the counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --------------------------------------------------------------------------- decoding


def center_crop_resize(img: "Image.Image", size: int, crop: float = 1.0) -> "Image.Image":
    """Keep the central ``crop`` fraction of the largest centred square, resize to size x size."""
    from PIL import Image

    w, h = img.size
    side = min(w, h) * crop
    left, top = (w - side) / 2, (h - side) / 2
    box = (round(left), round(top), round(left + side), round(top + side))
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def decode_image(data: bytes, size: int, crop: float = 1.0) -> np.ndarray:
    """Bytes of any Pillow-readable image -> (size, size, 3) uint8 RGB; raises :class:`BadImage`."""
    from PIL import Image, ImageOps

    if not data:
        raise BadImage("unreadable", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
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
            img = _to_rgb(img)
            out = center_crop_resize(img, size, crop)
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


def _to_rgb(img: "Image.Image") -> "Image.Image":
    """Any mode -> RGB; 16-bit and float images are rescaled to 8 bits, alpha is flattened on black."""
    from PIL import Image

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


def resolve_uri(uri: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path within it) for a local path or a URI such as s3://bucket/key."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot open {uri}: {e}") from None


def list_images(uri: str) -> list[str]:
    """All image files under ``uri`` (recursive), sorted; paths are in the filesystem's terms."""
    import pyarrow.fs as pafs

    fs, root = resolve_uri(uri)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data source {uri!r} does not exist")
        if info.type == pafs.FileType.File:
            entries = [info]
        else:
            entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot list {uri!r}: {e}") from None
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


def split_paths(paths: list[str], val_fraction: float, root: str = "") -> tuple[list[str], list[str]]:
    """Deterministic train/val split by a hash of each path relative to ``root``.

    A file stays on the same side whatever else is added to the folder, and wherever the
    folder is mounted or copied (hence the relative path).
    """
    train, val = [], []
    for p in paths:
        rel = p[len(root):].lstrip("/") if root and p.startswith(root) else p
        (val if is_val(rel, val_fraction) else train).append(p)
    if paths and not val:  # tiny sets: keep at least one validation image
        val.append(train.pop())
    return train, val


def is_val(rel_path: str, val_fraction: float) -> bool:
    """Whether a (root-relative) path falls in the validation split."""
    h = int.from_bytes(hashlib.sha1(rel_path.encode()).digest()[:8], "big") / 2**64
    return h < val_fraction


# --------------------------------------------------------------------------- augmentation


def augment_d4(x: "torch.Tensor", generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """Apply an independent random element of the dihedral group D4 to each image.

    x: (B, C, S, S). Galaxies have no preferred orientation, so the 4 rotations by 90 degrees,
    each with or without a mirror flip, are equally valid views.
    """
    import torch

    b = x.shape[0]
    g = torch.randint(0, 8, (b,), generator=generator).to(x.device)
    out = torch.empty_like(x)
    for e in range(8):
        idx = (g == e).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        y = torch.rot90(x[idx], e % 4, dims=(2, 3))
        out[idx] = torch.flip(y, dims=(3,)) if e >= 4 else y
    return out


# --------------------------------------------------------------------------- built-in dataset


def cache_dir() -> Path:
    """Folder for built datasets: $RAY_GALAXY_CACHE or ~/.cache/ray-galaxy."""
    return Path(os.environ.get("RAY_GALAXY_CACHE", Path.home() / ".cache" / "ray-galaxy"))


def build_hubble_xdf(root: Path | None = None, k_sigma: float = 3.0, min_area: int = 60,
                     pad: float = 1.6, out_size: int = 64) -> Path:
    """Cut galaxies out of the Hubble eXtreme Deep Field image shipped with scikit-image.

    Sources are pixels more than ``k_sigma`` robust standard deviations above the median
    background of the smoothed luminance, grouped into connected components; components of at
    least ``min_area`` pixels not touching the border are cut out as squares ``pad`` times
    their larger extent and resized to ``out_size``. Built once; later calls reuse the folder.
    """
    from PIL import Image
    from skimage import data as skdata, filters, measure

    root = Path(root) if root else cache_dir() / "hubble-xdf-v1"
    if (root / "manifest.json").is_file():
        return root
    img = skdata.hubble_deep_field()  # (872, 1000, 3) uint8, ships inside scikit-image
    lum = img.astype(np.float32).mean(-1)
    bg = float(np.median(lum))
    noise = float(np.median(np.abs(lum - bg)) * 1.4826)
    smooth = filters.gaussian(lum, sigma=1.5, preserve_range=True)
    labels = measure.label(smooth > bg + k_sigma * noise)
    h, w = lum.shape
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hubble-xdf-", dir=root.parent))
    kept = []
    for p in measure.regionprops(labels):
        if p.area < min_area:
            continue
        r0, c0, r1, c1 = p.bbox
        side = max(int(max(r1 - r0, c1 - c0) * pad), 16)
        cy, cx = (r0 + r1) // 2, (c0 + c1) // 2
        top, left = cy - side // 2, cx - side // 2
        if top < 0 or left < 0 or top + side > h or left + side > w:
            continue
        cut = Image.fromarray(img[top:top + side, left:left + side])
        cut = cut.resize((out_size, out_size), Image.Resampling.LANCZOS)
        name = f"xdf_{len(kept):04d}.png"
        cut.save(tmp / name)
        kept.append({"file": name, "row": int(cy), "col": int(cx), "side": side, "area": int(p.area)})
    (tmp / "manifest.json").write_text(json.dumps({
        "source": "skimage.data.hubble_deep_field()", "k_sigma": k_sigma, "min_area": min_area,
        "count": len(kept), "cutouts": kept}, indent=1))
    try:
        tmp.rename(root)  # atomic: concurrent builders never see a half-built folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "manifest.json").is_file():
            raise
    return root


def resolve_data_uri(data: str) -> str:
    """Map a built-in dataset name to its (built on demand) folder; other URIs pass through."""
    if data == "hubble-xdf":
        return str(build_hubble_xdf())
    return data


# --------------------------------------------------------------------------- Ray Data


@dataclass
class DataStats:
    """What was read: image counts per split and the skipped files with their reasons."""

    source: str
    files: int = 0
    train_images: int = 0
    val_images: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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


def read_images(paths: list[str], filesystem: Any, size: int, crop: float) -> "ray.data.Dataset":
    """Lazy Ray dataset of decoded images with columns image, path, error ('' when good)."""
    import ray

    ds = ray.data.read_binary_files(paths, filesystem=filesystem, include_paths=True,
                                    ignore_missing_paths=False)
    return ds.map_batches(_Decode(size, crop), batch_size=64, batch_format="numpy")


def _good_only(ds: "ray.data.Dataset") -> "ray.data.Dataset":
    return ds.filter(lambda row: row["error"] == "").select_columns(["image"])


def load_datasets(data: str, image_size: int, crop: float, val_fraction: float
                  ) -> tuple["ray.data.Dataset", "ray.data.Dataset", DataStats]:
    """Read, decode and split a galaxy image source into materialized train/val Ray datasets.

    Decoding happens once; epochs then iterate the decoded uint8 arrays from the object
    store, so training never waits on JPEG decoding. Bad files are dropped and counted.
    """
    import logging

    import ray

    # Our own progress lines say what happens; Ray Data's per-operator logging would bury them.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    t0 = time.time()
    uri = resolve_data_uri(data)
    from ray_galaxy.prepare import read_manifest

    manifest = read_manifest(uri)
    if manifest is not None:
        return _load_prepared(uri, manifest, image_size, crop, val_fraction, t0)
    paths = list_images(uri)
    fs, root = resolve_uri(uri)
    train_paths, val_paths = split_paths(paths, val_fraction, root=root)
    stats = DataStats(source=data, files=len(paths))
    out = []
    for split_paths_ in (train_paths, val_paths):
        ds = read_images(split_paths_, fs, image_size, crop).materialize()
        bad = ds.filter(lambda row: row["error"] != "").select_columns(["path", "error"]).take_all()
        for row in bad:
            reason = row["error"].split(":", 1)[0]
            stats.skipped_by_reason[reason] = stats.skipped_by_reason.get(reason, 0) + 1
            if len(stats.skipped_examples) < 20:
                stats.skipped_examples.append(f"{row['path']}: {row['error']}")
        stats.skipped += len(bad)
        good = _good_only(ds)
        # Many small blocks: Train's equal split may drop up to (workers - 1) rows an epoch to
        # keep DDP ranks in step; with blocks visited in random order that is a different
        # handful each epoch rather than the same images forever.
        out.append(good.repartition(max(8, min(256, len(split_paths_) // 64))).materialize())
    stats.train_images = out[0].count()
    stats.val_images = out[1].count()
    stats.seconds = round(time.time() - t0, 2)
    if stats.train_images == 0:
        raise DataError(f"no readable training images in {data!r} "
                        f"({stats.skipped} files skipped: {stats.skipped_by_reason})")
    if stats.val_images == 0:
        raise DataError(f"no readable validation images in {data!r}; lower the number of "
                        f"bad files or raise val_fraction")
    return out[0], out[1], stats


class _Resize:
    """Ray Data batch UDF: shard images (raw bytes or uint8 arrays) -> uint8 images,
    cropped/resized to the training size."""

    def __init__(self, size: int, crop: float, stored_size: int) -> None:
        self.size, self.crop, self.stored = size, crop, stored_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        s = self.stored
        imgs = batch["image"]
        if imgs.dtype == object:
            imgs = np.frombuffer(b"".join(imgs), dtype=np.uint8).reshape(-1, s, s, 3)
        if imgs.shape[1] == self.size and self.crop == 1.0:
            return {"image": imgs}
        out = np.stack([np.asarray(center_crop_resize(Image.fromarray(im), self.size, self.crop))
                        for im in imgs])
        return {"image": out}


class _ParseShards:
    """Ray Data batch UDF: whole Parquet shard files (their bytes) -> rows of uint8 images.

    Reading the files as bytes and parsing them here is ~4x faster than ``read_parquet`` for
    these shards (a few large binary values per row; benchmarks/README.md, "Ingest")."""

    def __init__(self, stored_size: int, columns: tuple[str, ...] = ("image", "path")) -> None:
        self.stored, self.columns = stored_size, columns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        s, out = self.stored, {c: [] for c in self.columns}
        for blob in batch["bytes"]:
            table = pq.read_table(pa.BufferReader(blob), columns=list(self.columns))
            for c in self.columns:
                values = table.column(c).to_numpy(zero_copy_only=False)
                if c == "image":
                    values = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(-1, s, s, 3)
                out[c].append(values)
        return {c: np.concatenate(v) for c, v in out.items()}


def read_shards(files: list[str], filesystem: Any, stored_size: int,
                columns: tuple[str, ...] = ("image", "path")) -> "ray.data.Dataset":
    """A dataset of the rows of prepared shard files: ``image`` as (S, S, 3) uint8, ``path``."""
    import ray

    return ray.data.read_binary_files(files, filesystem=filesystem).map_batches(
        _ParseShards(stored_size, columns), batch_size=1, batch_format="numpy")


def _load_prepared(uri: str, manifest: dict[str, Any], image_size: int, crop: float,
                   val_fraction: float, t0: float) -> tuple["ray.data.Dataset", "ray.data.Dataset", DataStats]:
    """Train/val datasets from a jobs/prepare_data.py output (Parquet shards, no decoding)."""
    fs, root = resolve_uri(uri)
    files = [f"{root.rstrip('/')}/{s}" for s in manifest["shards"]]
    ds = read_shards(files, fs, int(manifest["image_size"]))
    stats = DataStats(source=uri, files=int(manifest.get("written", 0)))
    stats.skipped_by_reason = {f"prepare:{k}": v for k, v in manifest.get("dropped", {}).items()}
    out = []
    for want_val in (False, True):
        part = ds.filter(lambda r, v=want_val: is_val(r["path"], val_fraction) == v)
        part = part.map_batches(_Resize(image_size, crop, int(manifest["image_size"])), batch_size=64,
                                batch_format="numpy")
        n_blocks = max(8, min(256, stats.files // 64))
        out.append(part.repartition(n_blocks).materialize())
    stats.train_images, stats.val_images = out[0].count(), out[1].count()
    stats.seconds = round(time.time() - t0, 2)
    if stats.train_images == 0 or stats.val_images == 0:
        raise DataError(f"prepared data {uri!r} gives {stats.train_images} train and "
                        f"{stats.val_images} validation images; need at least one of each")
    return out[0], out[1], stats
