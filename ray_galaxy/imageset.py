"""Image collections read into memory in one process (no Ray Data): evaluation and sampler fits.

Training streams through Ray Data (:mod:`ray_galaxy.data`); jobs that need a few thousand
images as one array (the evaluation, fitting the sampler) read them here, with the same
decoding, crop and train/val split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ray_galaxy.builtin import BUILTIN_DATASETS, resolve_data_uri
from ray_galaxy.data import (BadImage, DataError, data_sources, decode_image, is_val, list_images, read_manifest,
                             resize_images, shard_images, split_paths)
from ray_galaxy.labels import labels_for, read_labels
from ray_galaxy.storage import exists, join, location_key, resolve


@dataclass
class ImageSet:
    """Images read into memory with where each came from and, when known, its class."""

    images: np.ndarray  # (N, size, size, 3) uint8
    paths: list[str]  # per image: relative to the input for prepared shards, else the file's path
    labels: list[str | None] | None  # per image (None: unlabelled); None when nothing is labelled
    info: dict[str, Any]


def same_source(a: str, b: str) -> bool:
    """Whether two data settings name the same places (built-in names resolved first; several
    sources in any order)."""
    try:
        return ({location_key(resolve_data_uri(u)) for u in data_sources(a)} ==
                {location_key(resolve_data_uri(u)) for u in data_sources(b)})
    except Exception:  # noqa: BLE001 - unreadable means "not provably the same"
        return a == b


def recorded_train_data(train_config: dict[str, Any]) -> str | None:
    """The training data a model's config.json records, when all of it can still be read; else None."""
    data = train_config.get("data")
    if not data:
        return None
    try:
        return data if all(u in BUILTIN_DATASETS or exists(u) for u in data_sources(data)) else None
    except Exception:  # noqa: BLE001 - an unreachable URI means "not available"
        return None


def _shard_images(uri: str, manifest: dict[str, Any], size: int, crop: float, limit: int | None,
                  split: str | None, val_fraction: float, rng: np.random.Generator,
                  info: dict[str, Any]) -> tuple[list[np.ndarray], list[str], list[str | None] | None]:
    fs, root = resolve(uri)
    s = int(manifest["image_size"])
    labelled = bool(manifest.get("labels"))  # jobs/prepare_data.py --labels stored a label column
    raw, paths, labels = [], [], []
    for shard in manifest["shards"]:
        t = pq.read_table(join(root, shard), columns=["image", "path"] + (["label"] if labelled else []),
                          filesystem=fs)
        raw += t.column("image").to_pylist()
        paths += t.column("path").to_pylist()
        labels += t.column("label").to_pylist() if labelled else []
    keep = [i for i, p in enumerate(paths) if split is None or is_val(p, val_fraction) == (split == "val")]
    if limit is not None and len(keep) > limit:
        keep = sorted(rng.choice(keep, limit, replace=False).tolist())
    info["files"] = len(paths)
    images = list(resize_images(shard_images([raw[i] for i in keep], s), size, crop))
    return images, [paths[i] for i in keep], [labels[i] for i in keep] if labelled else None


def _file_images(uri: str, size: int, crop: float, limit: int | None, split: str | None,
                 val_fraction: float, rng: np.random.Generator,
                 info: dict[str, Any]) -> tuple[list[np.ndarray], list[str]]:
    fs, root = resolve(uri)
    paths = list_images(uri)
    info["files"] = len(paths)
    if split is not None:
        paths = split_paths(paths, val_fraction, root=root)[split == "val"]
    if limit is not None and len(paths) > limit:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), limit, replace=False))]
    images, read = [], []
    for p in paths:
        try:
            with fs.open_input_stream(p) as f:
                images.append(decode_image(f.read(), size, crop))
            read.append(p)
        except BadImage:
            info["skipped"] += 1
    return images, read


def read_image_set(data: str, size: int, crop: float, limit: int | None = None, split: str | None = None,
                   val_fraction: float = 0.1, seed: int = 0, labels: str | None = None) -> ImageSet:
    """Images from a folder/URI of pictures, a prepared dataset or 'hubble-xdf', or several of
    them (:func:`ray_galaxy.data.data_sources`), with their paths.

    Several sources are read one by one (each split by its own relative paths, as training does)
    and joined; ``limit`` then keeps a seeded random subset of the whole.
    """
    sources = data_sources(data)
    if len(sources) == 1:
        return _read_one(sources[0], size, crop, limit, split, val_fraction, seed, labels)
    parts = [_read_one(u, size, crop, limit, split, val_fraction, seed, labels) for u in sources]
    keep = np.arange(sum(len(p.images) for p in parts))
    if limit is not None and len(keep) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(keep, limit, replace=False))
    paths = [p for part in parts for p in part.paths]
    labelled = any(part.labels is not None for part in parts)
    found = [label for part in parts for label in (part.labels or [None] * len(part.images))]
    info = {"source": data, "split": split or "all", "files": sum(p.info.get("files", 0) for p in parts),
            "skipped": sum(p.info["skipped"] for p in parts), "images": len(keep),
            "sources": [p.info for p in parts]}
    sources_of_labels = {p.info.get("labels_source") for p in parts} - {None}
    if sources_of_labels:
        info["labels_source"] = sorted(sources_of_labels)[0]
    return ImageSet(np.concatenate([p.images for p in parts])[keep], [paths[i] for i in keep],
                    [found[i] for i in keep] if labelled else None, info)


def _read_one(uri: str, size: int, crop: float, limit: int | None, split: str | None,
              val_fraction: float, seed: int, labels: str | None) -> ImageSet:
    """One source of :func:`read_image_set`.

    ``split`` ('train' or 'val') keeps one side of the training job's hash split
    (:func:`ray_galaxy.data.split_paths`, :func:`ray_galaxy.data.is_val`); ``limit`` keeps a
    seeded random subset. Unreadable files are skipped and counted. Each image's class comes
    from the ``labels`` CSV (:mod:`ray_galaxy.labels`) when given, else from the shards' label
    column when ``jobs/prepare_data.py --labels`` stored one.
    """
    uri = resolve_data_uri(uri)
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {"source": uri, "split": split or "all", "skipped": 0}
    table = read_labels(labels) if labels else None  # a bad CSV fails before any image is read
    manifest = read_manifest(uri)
    found: list[str | None] | None = None
    if manifest is not None and "shards" in manifest:  # jobs/prepare_data.py output: Parquet shards
        images, paths, found = _shard_images(uri, manifest, size, crop, limit, split, val_fraction, rng, info)
        if found is not None:
            info["labels_source"] = manifest["labels"].get("source")
    else:
        images, paths = _file_images(uri, size, crop, limit, split, val_fraction, rng, info)
    if not images:
        raise DataError(f"no readable images in {uri!r} (split {info['split']})")
    if table is not None:  # the CSV given wins over labels stored in the shards
        found, info["labels_source"] = labels_for(paths, table), labels
    info["images"] = len(images)
    return ImageSet(np.stack(images), paths, found, info)


def load_images(uri: str, size: int, crop: float, limit: int | None = None, split: str | None = None,
                val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """(N, size, size, 3) uint8 images and what was read (:func:`read_image_set`, without paths)."""
    found = read_image_set(uri, size, crop, limit, split, val_fraction, seed)
    return found.images, found.info
