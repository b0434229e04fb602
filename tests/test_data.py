"""Data: guarded decoding, crop/resize, D4 augmentation of training batches, deterministic split,
the built-in set, Ray Data reading."""

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from ray_galaxy.builtin import build_hubble_xdf
from ray_galaxy.data import (BadImage, DataError, center_crop_resize, decode_image, is_val, list_images,
                             read_manifest, resize_images, shard_splits, split_key, split_paths)
from ray_galaxy.images import augment_d4
from ray_galaxy.prepare import PrepareConfig, prepare
from ray_galaxy.streaming import CACHE_SHARE, choose_cache, load_datasets
from synthetic import galaxy, jpeg_bytes, write_corrupt


def _png(arr, mode=None):
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_rgb_png_exact_at_same_size():
    arr = galaxy(32, np.random.default_rng(0))
    out = decode_image(_png(arr), 32, crop=1.0)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    assert np.array_equal(out, arr)


def test_crop_keeps_the_centre():
    # A 100x60 image whose central 20x20 square is white, the rest black.
    arr = np.zeros((60, 100, 3), np.uint8)
    arr[20:40, 40:60] = 255
    out = np.asarray(center_crop_resize(Image.fromarray(arr), 20, crop=20 / 60))
    assert out.shape == (20, 20, 3) and out.min() == 255
    full = np.asarray(center_crop_resize(Image.fromarray(arr), 30, crop=1.0))
    # crop 1.0 keeps the central 60x60 square: white square occupies the middle third
    assert full[15, 15].min() > 200 and full[1, 1].max() < 30


def test_resize_images_keeps_the_centre_and_passes_through_at_the_same_size():
    arr = np.zeros((2, 60, 60, 3), np.uint8)
    arr[:, 20:40, 20:40] = 255
    assert resize_images(arr, 60, 1.0) is arr
    out = resize_images(arr, 20, crop=20 / 60)
    assert out.shape == (2, 20, 20, 3) and out.min() == 255
    assert resize_images(arr[:0], 20, 0.5).shape == (0, 20, 20, 3)


def test_decode_converts_greyscale_and_rgba_to_rgb():
    grey = np.full((40, 40), 100, np.uint8)
    assert decode_image(_png(grey), 32).shape == (32, 32, 3)
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    out = decode_image(_png(rgba), 32)
    assert out[..., 0].min() >= 199 and out[..., 1].max() == 0


@pytest.mark.parametrize("data,reason", [
    (b"", "unreadable"),
    (b"this is not an image", "unreadable"),
    ("truncated", "unreadable"),
    ("tiny", "too_small"),
])
def test_bad_bytes_raise_badimage_with_reason(data, reason):
    if data == "truncated":
        full = jpeg_bytes(galaxy(64, np.random.default_rng(1)))
        data = full[: len(full) // 3]
    elif data == "tiny":
        data = _png(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(BadImage) as e:
        decode_image(data, 32)
    assert e.value.reason == reason


def test_d4_augmentation_gives_one_of_the_eight_symmetries():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4).repeat(50, 1, 1, 1)
    y = augment_d4(x, torch.Generator().manual_seed(0))
    group = []
    for k in range(4):
        r = torch.rot90(x[:1], k, dims=(2, 3))
        group += [r, torch.flip(r, dims=(3,))]
    seen = set()
    for i in range(0, len(x), 2):
        matches = [j for j, g in enumerate(group) if torch.equal(y[i:i + 1], g)]
        assert len(matches) == 1, "each output must be exactly one D4 transform of its input"
        seen.add(matches[0])
    assert len(seen) == 8, "all eight group elements should occur over 50 draws"


def test_split_is_deterministic_and_independent_of_other_files():
    paths = [f"/data/gal_{i}.jpg" for i in range(1000)]
    tr, va = split_paths(paths, 0.2, root="/data")
    tr2, va2 = split_paths(list(reversed(paths)) + ["/data/new.jpg"], 0.2, root="/data")
    assert set(va) <= set(va2) and set(tr) <= set(tr2)
    assert 150 < len(va) < 250 and not set(tr) & set(va)
    # the same files under another mount point fall on the same side
    moved = [p.replace("/data", "/mnt/copy") for p in paths]
    _, va3 = split_paths(moved, 0.2, root="/mnt/copy")
    assert {p.replace("/mnt/copy", "/data") for p in va3} == set(va)


def test_list_images_is_recursive_and_errors_clearly(tmp_path, tiny_folder):
    paths = list_images(str(tiny_folder))
    assert len(paths) == 40 and any("/nested/" in p for p in paths)
    with pytest.raises(DataError, match="does not exist"):
        list_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        list_images(str(tmp_path / "empty"))


def test_hubble_xdf_builds_about_200_galaxy_cutouts(tmp_path):
    root = build_hubble_xdf(tmp_path / "xdf")
    files = sorted(root.glob("*.png"))
    assert 150 <= len(files) <= 350
    img = np.asarray(Image.open(files[0]))
    assert img.shape == (64, 64, 3)
    # a galaxy in the middle: the centre is brighter than the border
    assert img[24:40, 24:40].mean() > img[:6].mean() + 10
    assert build_hubble_xdf(tmp_path / "xdf") == root  # built once, reused
    assert read_manifest(str(root)) is None, "its own manifest.json is not a prepared-shards manifest"


def test_corrupt_files_are_skipped_and_counted_every_good_image_used(ray_address, tiny_folder, tmp_path):
    data = tmp_path / "mixed"
    shutil.copytree(tiny_folder, data)
    bad = write_corrupt(data / "broken")
    train, val, stats = load_datasets(str(data), 32, 1.0, 0.2)
    assert stats.files == 43
    assert stats.skipped == len(bad) == 3
    assert stats.skipped_by_reason == {"unreadable": 3}
    assert stats.train_images + stats.val_images == 40
    assert train.count() == stats.train_images and val.count() == stats.val_images
    row = train.take(1)[0]
    assert row["image"].shape == (32, 32, 3) and row["image"].dtype == np.uint8


def test_builtin_dataset_loads_through_ray_data(ray_address):
    """`python jobs/train.py` with no --data reads the built-in set (its folder has a manifest
    of its own, which must not be mistaken for prepared shards)."""
    train, val, stats = load_datasets("hubble-xdf", 32, 1.0, 0.1)
    assert stats.skipped == 0 and 150 <= stats.train_images + stats.val_images <= 350
    assert train.take(1)[0]["image"].shape == (32, 32, 3)


def _images(ds) -> list[bytes]:
    return sorted(r["image"].tobytes() for r in ds.iter_rows())


def test_streamed_data_counts_bad_files_as_the_first_epoch_reads_them(ray_address, tiny_folder, tmp_path):
    data = tmp_path / "mixed"
    shutil.copytree(tiny_folder, data)
    write_corrupt(data / "broken")
    train, val, stats = load_datasets(str(data), 32, 1.0, 0.2, cache="off", seed=0)
    assert stats.cache == "off" and not stats.complete and stats.skipped == 0
    assert sum(stats.files_per_split.values()) == 43
    streamed = {"train": _images(train), "val": _images(val)}  # one epoch
    stats.finish()
    assert stats.complete and stats.skipped == 3 and stats.skipped_by_reason == {"unreadable": 3}
    assert (stats.train_images, stats.val_images) == (len(streamed["train"]), len(streamed["val"]))
    assert stats.train_images + stats.val_images == 40
    _images(train)  # a second epoch meets the same bad files: still counted once
    stats.finish()
    assert stats.skipped == 3 and "ledger" not in stats.to_dict()
    cached_train, cached_val, cached = load_datasets(str(data), 32, 1.0, 0.2, cache="on", seed=0)
    assert cached.complete and cached.skipped_by_reason == stats.skipped_by_reason
    assert _images(cached_train) == streamed["train"] and _images(cached_val) == streamed["val"]


def test_cache_auto_caches_what_fits_a_share_of_the_object_store(ray_address):
    cached, reason = choose_cache("auto", 100, 32)
    assert cached and "within 25%" in reason and "free object store" in reason
    huge = int(2 * ray.available_resources()["object_store_memory"] / (256 * 256 * 3 / CACHE_SHARE))
    cached, reason = choose_cache("auto", huge, 256)
    assert not cached and "over 25%" in reason
    assert choose_cache("on", huge, 256)[0] and not choose_cache("off", 1, 32)[0]
    with pytest.raises(DataError, match="cache must be one of auto, on, off"):
        choose_cache("sometimes", 1, 32)


def test_prepared_shards_hold_one_key_range_each_and_stream_per_split(ray_address, tiny_folder, tmp_path):
    out = tmp_path / "prepared"
    m = prepare(PrepareConfig(input=str(tiny_folder), output=str(out), image_size=32, crop=1.0, rows_per_shard=8))
    assert m["shard_rows"] == [8, 8, 8, 8, 8] and len(m["split_keys"]) == 5
    for name, (lo, hi) in zip(m["shards"], m["split_keys"]):
        keys = [split_key(p) for p in pq.read_table(out / name, columns=["path"]).column("path").to_pylist()]
        assert keys == sorted(keys) and (min(keys), max(keys)) == (lo, hi)
    assert all(a[1] < b[0] for a, b in zip(m["split_keys"], m["split_keys"][1:])), "disjoint, in key order"
    sides = shard_splits(m, 0.2)
    assert sorted(sum(sides.values(), [])) == list(range(5)) and len(sides["mixed"]) <= 1
    paths = list_images(str(tiny_folder))
    n_val = sum(is_val(p[len(str(tiny_folder)) + 1:], 0.2) for p in paths)

    train, val, stats = load_datasets(str(out), 32, 1.0, 0.2, cache="off", seed=0)
    assert stats.cache == "off" and (stats.train_images, stats.val_images) == (40 - n_val, n_val)
    streamed = (_images(train), _images(val))
    assert (len(streamed[0]), len(streamed[1])) == (40 - n_val, n_val)
    cached = load_datasets(str(out), 32, 1.0, 0.2, cache="on", seed=0)
    assert (_images(cached[0]), _images(cached[1])) == streamed

    # An output prepared before shards were split-ordered: still read (once, cached), same split.
    legacy = {k: v for k, v in m.items() if k not in ("split_keys", "shard_rows")}
    (out / "manifest.json").write_text(json.dumps(legacy))
    assert shard_splits(legacy, 0.2) is None
    old = load_datasets(str(out), 32, 1.0, 0.2, cache="off", seed=0)
    assert old[2].cache == "on" and "re-run jobs/prepare_data.py" in old[2].cache_reason
    assert (_images(old[0]), _images(old[1])) == streamed
