"""Training datasets: streamed from storage every epoch, or decoded once and cached (``--cache``).

Built from the readers of :mod:`ray_galaxy.data`, for a folder of pictures and for prepared
shards alike:

* **The split is decided once, before reading.** Pictures go to train or val by the hash of
  their path (:func:`ray_galaxy.data.split_paths`); prepared shards are written in that hash's
  order with each shard's key range in the manifest, so a shard is wholly train, wholly val,
  or (at most one per output) mixed (:func:`ray_galaxy.data.shard_splits`). The mixed shard is
  read once here and its rows routed; every other file belongs to one dataset, so no file is
  read twice in an epoch.
* **Streamed** (cache off): every epoch reads the files again through Ray Data to the Train
  workers, in a file order shuffled by the seed and the epoch (``FileShuffleConfig`` with
  ``reseed_after_execution``: Ray Data reseeds each execution, and Ray Train executes the
  dataset once per epoch). Unreadable pictures are dropped by the decode step and recorded,
  once each, by a small ledger actor: their counts are complete once the first epoch has read
  every file (:meth:`DataStats.refresh`).
* **Cached** (cache on): decoded once into the object store, blocks visited in a seeded order
  per epoch; counts are complete before training starts.
* **auto** caches when the decoded set takes at most :data:`CACHE_SHARE` of the object store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.data import FileShuffleConfig, RandomSeedConfig

from ray_galaxy.builtin import resolve_data_uri
from ray_galaxy.config import CACHE_MODES
from ray_galaxy.console import log
from ray_galaxy.data import (DataError, Resize, data_sources, is_val, list_sources, read_images, read_manifest,
                             read_shards, shard_splits, split_paths)
from ray_galaxy.runtime import quiet_ray
from ray_galaxy.storage import join, resolve

# auto caches the decoded images when they take at most this share of the free object store:
# the rest stays for Ray Data's streaming buffers, Train's checkpoints and other jobs.
CACHE_SHARE = 0.25
# Blocks per cached split: many small ones (see _blocks).
MIN_BLOCKS, MAX_BLOCKS = 8, 256


@dataclass
class DataStats:
    """What was read: image counts per split and the skipped files with their reasons.

    When streaming, unreadable pictures are found as the first epoch reads them: ``complete``
    is False until :meth:`refresh` has run after that epoch."""

    source: str
    files: int = 0
    train_images: int = 0
    val_images: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cache: str = "on"
    cache_reason: str = ""
    complete: bool = True
    files_per_split: dict[str, int] = field(default_factory=dict)
    ledger: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The stats as a plain dict (for metrics.json)."""
        return {k: v for k, v in self.__dict__.items() if k != "ledger"}

    def refresh(self) -> None:
        """Take the skipped pictures recorded so far by the decode step into the counts."""
        if self.ledger is None:
            return
        bad: dict[str, tuple[str, str]] = ray.get(self.ledger.get.remote())
        prepared = {k: v for k, v in self.skipped_by_reason.items() if k.startswith("prepare:")}
        self.skipped_by_reason = dict(prepared)
        for split, error in bad.values():
            reason = error.split(":", 1)[0]
            self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
        self.skipped_examples = [f"{p}: {bad[p][1]}" for p in sorted(bad)[:20]]
        self.skipped = len(bad)
        per_split = {s: sum(1 for v in bad.values() if v[0] == s) for s in ("train", "val")}
        self.train_images = self.files_per_split.get("train", 0) - per_split["train"]
        self.val_images = self.files_per_split.get("val", 0) - per_split["val"]

    def finish(self) -> None:
        """After the first (streamed) epoch, which read every file: the counts are complete."""
        self.refresh()
        self.complete = True

    def check(self) -> None:
        """Raise a :class:`DataError` when a split has no usable image."""
        if self.train_images == 0:
            raise DataError(f"no readable training images in {self.source!r} "
                            f"({self.skipped} files skipped: {self.skipped_by_reason})")
        if self.val_images == 0:
            raise DataError(f"no readable validation images in {self.source!r}; lower the number "
                            "of bad files or raise val_fraction")


@ray.remote(num_cpus=0)
class _BadFiles:
    """The pictures the decode step dropped, once each (a streamed epoch meets them again)."""

    def __init__(self) -> None:
        self.bad: dict[str, tuple[str, str]] = {}

    def record(self, split: str, paths: list[str], errors: list[str]) -> None:
        for p, e in zip(paths, errors):
            self.bad.setdefault(p, (split, e))

    def get(self) -> dict[str, tuple[str, str]]:
        return self.bad


class _DropBad:
    """Ray Data batch UDF after decoding: keep the good images, record the bad files.

    The ledger call waits for its answer, so a file is recorded before any row of its batch
    reaches training: when an execution ends, everything it met is counted."""

    def __init__(self, ledger: Any, split: str) -> None:
        self.ledger, self.split = ledger, split

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        bad = batch["error"] != ""
        if bad.any():
            ray.get(self.ledger.record.remote(self.split, list(batch["path"][bad]), list(batch["error"][bad])))
        return {"image": batch["image"][~bad]}


# --------------------------------------------------------------------------- cache and order


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def object_store_bytes() -> float:
    """Free object store memory of the cluster (its total when Ray does not say what is free)."""
    return float(ray.available_resources().get("object_store_memory")
                 or ray.cluster_resources().get("object_store_memory", 0))


def choose_cache(mode: str, n_images: int, image_size: int) -> tuple[bool, str]:
    """Whether to cache ``n_images`` decoded images of ``image_size`` px, and why (for the log)."""
    if mode not in CACHE_MODES:
        raise DataError(f"cache must be one of {', '.join(CACHE_MODES)}; got {mode!r}")
    if mode != "auto":
        return mode == "on", f"cache {mode}"
    need, store = n_images * image_size * image_size * 3, object_store_bytes()
    fits = need <= CACHE_SHARE * store
    return fits, (f"cache auto: {n_images} decoded images take {_size(need)}, "
                  f"{'within' if fits else 'over'} {CACHE_SHARE:.0%} of the {_size(store)} free object store")


def _log_cache(cached: bool, reason: str) -> None:
    what = "decoded once, kept in Ray's object store" if cached else "streamed from storage every epoch"
    log(f"data: {what} ({reason})")


def file_shuffle(seed: int | None) -> Any:
    """Read order of a streamed epoch: files shuffled by ``seed`` and the execution (= epoch)
    index; unseeded when ``seed`` is None."""
    return FileShuffleConfig(seed=seed, reseed_after_execution=True) if seed is not None else "files"


def _blocks(n_images: int) -> int:
    """Blocks to split ``n_images`` into.

    Many small blocks: Train's equal split may drop up to (workers - 1) rows an epoch to keep
    DDP ranks in step; with blocks visited in random order that is a different handful each
    epoch rather than the same images forever.
    """
    return max(MIN_BLOCKS, min(MAX_BLOCKS, n_images // 64))


def _cached(ds: ray.data.Dataset, n_images: int, seed: int | None,
            shuffle: bool) -> tuple[ray.data.Dataset, int]:
    """``ds`` computed into the object store (the training split's blocks then visited in a new
    seeded order each epoch), and its number of rows."""
    cached = _in_order(ds.repartition(_blocks(n_images))).materialize()
    if not shuffle:
        return cached, cached.count()
    return cached.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True)), cached.count()


def _in_order(ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds`` computed with its rows in order: Ray Data's tasks finish in varying order, and a
    cache computed in that order would make the seeded block order differ between runs."""
    ds.context.execution_options.preserve_order = True
    return ds


def _union(a: ray.data.Dataset | None, b: ray.data.Dataset | None) -> ray.data.Dataset | None:
    if a is None or b is None:
        return a if b is None else b
    return a.union(b)


# --------------------------------------------------------------------------- the sources


def load_datasets(data: str, image_size: int, crop: float, val_fraction: float, cache: str = "on",
                  seed: int | None = None) -> tuple[ray.data.Dataset, ray.data.Dataset, DataStats]:
    """Train/val Ray datasets of uint8 images (column ``image``) from any source, or several
    (:func:`ray_galaxy.data.data_sources`: folders of pictures on one filesystem read as one,
    prepared outputs joined), and their stats.

    ``cache`` is on (decode once into the object store), off (stream every epoch) or auto (on
    when it fits :data:`CACHE_SHARE` of the object store); ``seed`` seeds each epoch's order
    (None: unseeded). Logs one line saying which and why.
    """
    quiet_ray()
    t0 = time.time()
    uris = [resolve_data_uri(d) for d in data_sources(data)]
    manifests = [read_manifest(u) for u in uris]
    if len(uris) == 1 and manifests[0] is not None:
        train, val, stats = _prepared(uris[0], manifests[0], image_size, crop, val_fraction, cache, seed)
    elif all(m is None for m in manifests):
        train, val, stats = _files(data, uris, image_size, crop, val_fraction, cache, seed)
    elif all(m is not None for m in manifests):
        train, val, stats = _several_prepared(data, uris, manifests, image_size, crop, val_fraction, cache, seed)
    else:
        raise DataError(f"data {data!r} mixes prepared outputs and folders of pictures; prepare them all "
                        "(jobs/prepare_data.py) or none")
    stats.seconds = round(time.time() - t0, 2)
    if stats.complete:
        stats.check()
    return train, val, stats


def _files(data: str, uris: list[str], image_size: int, crop: float, val_fraction: float, cache: str,
           seed: int | None) -> tuple[ray.data.Dataset, ray.data.Dataset, DataStats]:
    """Folders or URIs of pictures (one or several, read as one collection), decoded with the
    guard; bad files dropped and counted."""
    fs, relative = list_sources(uris)
    paths = sorted(relative)
    train_paths, val_paths = split_paths(paths, val_fraction, relative=relative)
    cached, reason = choose_cache(cache, len(paths), image_size)
    _log_cache(cached, reason)
    stats = DataStats(source=data, files=len(paths), cache="on" if cached else "off", cache_reason=reason,
                      complete=cached, files_per_split={"train": len(train_paths), "val": len(val_paths)},
                      ledger=_BadFiles.remote())

    def read(part: list[str], split: str, shuffle: Any) -> ray.data.Dataset:
        return read_images(part, fs, image_size, crop, shuffle=shuffle, blocks=_blocks(len(part))
                           ).map_batches(_DropBad(stats.ledger, split), batch_format="numpy")

    if cached:
        train = _cached(read(train_paths, "train", None), len(train_paths), seed, shuffle=True)[0]
        val = _cached(read(val_paths, "val", None), len(val_paths), seed, shuffle=False)[0]
    else:
        train, val = read(train_paths, "train", file_shuffle(seed)), read(val_paths, "val", None)
    stats.refresh()
    return train, val, stats


def _several_prepared(data: str, uris: list[str], manifests: list[dict[str, Any]], image_size: int, crop: float,
                      val_fraction: float, cache: str, seed: int | None
                      ) -> tuple[ray.data.Dataset, ray.data.Dataset, DataStats]:
    """Several jobs/prepare_data.py outputs as one: each read as :func:`_prepared` does, with one
    cache decision for all of them, joined; cached, the joined training blocks are visited in one
    seeded order, so an epoch mixes the sources."""
    total = sum(int(m.get("written", 0)) for m in manifests)
    cached, _ = choose_cache(cache, total, image_size)
    parts = [_prepared(u, m, image_size, crop, val_fraction, "on" if cached else "off", seed)
             for u, m in zip(uris, manifests)]
    train, val = parts[0][0], parts[0][1]
    for t, v, _ in parts[1:]:
        train, val = train.union(t), val.union(v)
    if cached:
        train = train.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    stats = DataStats(source=data, cache="on" if cached else "off", cache_reason=parts[0][2].cache_reason)
    for _, _, st in parts:
        stats.files += st.files
        stats.train_images += st.train_images
        stats.val_images += st.val_images
        for k, v in st.skipped_by_reason.items():
            stats.skipped_by_reason[k] = stats.skipped_by_reason.get(k, 0) + v
    return train, val, stats


def _prepared(uri: str, manifest: dict[str, Any], image_size: int, crop: float, val_fraction: float,
              cache: str, seed: int | None) -> tuple[ray.data.Dataset, ray.data.Dataset, DataStats]:
    """A jobs/prepare_data.py output: Parquet shards, no decoding; the split decided per shard."""
    fs, root = resolve(uri)
    stored = int(manifest["image_size"])
    files = [join(root, s) for s in manifest["shards"]]
    stats = DataStats(source=uri, files=int(manifest.get("written", 0)))
    stats.skipped_by_reason = {f"prepare:{k}": v for k, v in manifest.get("dropped", {}).items()}
    splits = shard_splits(manifest, val_fraction)
    rows = manifest.get("shard_rows")
    legacy = splits is None or not isinstance(rows, list) or len(rows) != len(files)
    if legacy:
        cached, reason = True, ("its manifest predates split-ordered shards, so every shard holds both "
                                "splits: read once; re-run jobs/prepare_data.py to stream it")
    else:
        cached, reason = choose_cache(cache, stats.files, image_size)
    _log_cache(cached, reason)
    stats.cache, stats.cache_reason = "on" if cached else "off", reason
    resize = Resize(image_size, crop, stored)
    if legacy:
        whole = _in_order(read_shards(files, fs, stored)).materialize()
        parts = {split: whole.filter(lambda r, v=(split == "val"): is_val(r["path"], val_fraction) == v)
                 for split in ("train", "val")}
        parts = {k: p.map_batches(resize, batch_size=64, batch_format="numpy") for k, p in parts.items()}
    else:
        parts = _split_shards(files, rows, splits, fs, stored, val_fraction, resize, None if cached else seed,
                              stats)
    if parts["train"] is None or parts["val"] is None:
        raise DataError(f"prepared data {uri!r} has no {'training' if parts['train'] is None else 'validation'} "
                        f"images at val_fraction {val_fraction}")
    if cached:
        train, stats.train_images = _cached(parts["train"], stats.files, seed, shuffle=True)
        val, stats.val_images = _cached(parts["val"], stats.files, seed, shuffle=False)
        return train, val, stats
    return parts["train"], parts["val"], stats


def _split_shards(files: list[str], rows: list[int], splits: dict[str, list[int]], fs: Any, stored: int,
                  val_fraction: float, resize: Resize, seed: int | None,
                  stats: DataStats) -> dict[str, ray.data.Dataset | None]:
    """Train and val datasets of split-ordered shards: whole shards streamed (train in a seeded
    file order), the mixed shard read once now and its rows routed. Counts into ``stats``."""
    mixed: dict[str, ray.data.Dataset | None] = {"train": None, "val": None}
    counts = {split: sum(rows[i] for i in splits[split]) for split in ("train", "val")}
    if splits["mixed"]:
        whole = _in_order(read_shards([files[i] for i in splits["mixed"]], fs, stored)).materialize()
        for split in ("train", "val"):
            part = whole.filter(lambda r, v=(split == "val"): is_val(r["path"], val_fraction) == v)
            part = _in_order(part.map_batches(resize, batch_size=64, batch_format="numpy")).materialize()
            n = part.count()
            counts[split] += n
            mixed[split] = part if n else None
    out: dict[str, ray.data.Dataset | None] = {}
    for split in ("train", "val"):
        whole_shards = [files[i] for i in splits[split]]
        streamed = None
        if whole_shards:
            shuffle = file_shuffle(seed) if split == "train" else None
            streamed = read_shards(whole_shards, fs, stored, ("image",), shuffle=shuffle, resize=resize)
        out[split] = _union(streamed, mixed[split])
    stats.train_images, stats.val_images = counts["train"], counts["val"]
    return out
