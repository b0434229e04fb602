"""jobs/prepare_data.py: guarded decoding, near-duplicate removal, manifest, atomic re-runs,
and training straight from the prepared shards."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import GZ2
from ray_galaxy.config import ConfigError
from ray_galaxy.data import DataError, read_manifest
from ray_galaxy.prepare import (DUPLICATE_BITS, HASH_FORMAT, PrepareConfig, find_duplicates, hamming,
                                perceptual_hash, prepare, prepare_image)
from ray_galaxy.streaming import load_datasets
from synthetic import clumpy_galaxy, write_corrupt
from test_train_e2e import run_job


def _jpeg_copy(data: bytes, side: int = 300, quality: int = 80) -> bytes:
    """The same picture as someone re-saved it: resized to side x side, re-encoded as JPEG."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize((side, side)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _check_copies_found_at_any_output_size(originals: list[bytes], crop: float) -> None:
    """At 32px and 256px outputs, each copy is a duplicate of its original and of nothing else,
    distinct galaxies are not duplicates, and the hashes themselves do not depend on the size."""
    n = len(originals)
    files = originals + [_jpeg_copy(f) for f in originals]
    by_size = {size: [prepare_image(f, size, crop, min_size=16)[1] for f in files] for size in (32, 256)}
    assert by_size[32] == by_size[256], "the hash must not depend on --image-size"
    for size, hashes in by_size.items():
        assert find_duplicates(hashes) == list(range(n, 2 * n)), f"at {size}px: exactly the copies go"
        h = np.frombuffer(b"".join(hashes), np.uint8).reshape(2 * n, -1)
        d = hamming(h[:n], h)  # originals against originals, then against copies
        own = np.diag(d[:, n:])
        others = d[~np.eye(n, 2 * n, dtype=bool) & ~np.eye(n, 2 * n, k=n, dtype=bool)]
        assert own.max() <= DUPLICATE_BITS < others.min(), (size, own.max(), others.min())


def test_copies_are_duplicates_whatever_the_output_size():
    rng = np.random.default_rng(0)
    _check_copies_found_at_any_output_size([_png(clumpy_galaxy(200, rng)) for _ in range(12)], crop=0.5)


@pytest.mark.skipif(not GZ2.is_dir(), reason="needs ../shared/datasets/gz2")
def test_real_galaxy_copies_are_duplicates_whatever_the_output_size():
    # At a 32px output, hashing the output itself put some of these copies 38+ bits away.
    files = sorted((GZ2 / "train").glob("*.jpg"))[:40]
    _check_copies_found_at_any_output_size([f.read_bytes() for f in files], crop=0.5)


def test_hash_refuses_thumbnails_of_another_size():
    with pytest.raises(ValueError, match="64x64 thumbnail"):
        perceptual_hash(np.zeros((32, 32, 3), np.uint8))


def test_find_duplicates_keeps_the_first_of_each_group():
    z = bytes(32)
    one = bytes([255]) + bytes(31)  # 8 bits away from z
    far = bytes([255] * 16) + bytes(16)  # 128 bits away
    assert find_duplicates([z, one, far, z], threshold=10) == [1, 3]
    assert find_duplicates([z, one], threshold=4) == []
    assert find_duplicates([]) == []


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """20 distinct galaxies, 3 near-copies, 3 broken files, 1 tiny picture."""
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(5)
    originals = []
    for i in range(20):
        img = clumpy_galaxy(96, rng)
        originals.append(img)
        (root / f"g{i:02d}.png").write_bytes(_png(img))
    for i in range(3):  # the same galaxy re-encoded and resized, under other names
        buf = io.BytesIO()
        Image.fromarray(originals[i]).resize((150, 150)).save(buf, "JPEG", quality=75)
        (root / f"zz_copy_of_g{i:02d}.jpg").write_bytes(buf.getvalue())
    write_corrupt(root / "broken")
    Image.fromarray(np.full((12, 12, 3), 99, np.uint8)).save(root / "tiny.png")
    return root


def test_prepare_counts_every_reason_and_writes_shards(ray_address, messy_folder, tmp_path):
    out = tmp_path / "prepared"
    m = prepare(PrepareConfig(input=str(messy_folder), output=str(out), image_size=32, crop=1.0,
                              dedupe=True, min_size=16, rows_per_shard=8))
    assert m["read"] == 27 and m["written"] == 20
    assert m["dropped"] == {"unreadable": 3, "duplicate": 3, "too_small": 1}
    assert read_manifest(str(out)) == m
    assert m["hash"] == HASH_FORMAT, "the manifest names the hash its hash column holds"
    assert len(m["shards"]) == 3 and all((out / s).is_file() for s in m["shards"])
    t = pq.read_table(out / m["shards"][0])
    assert set(t.column_names) >= {"image", "path", "hash", "width", "height"}
    meta = pq.ParquetFile(out / m["shards"][0]).metadata.row_group(0)
    image_col = meta.column(t.column_names.index("image"))
    assert m["compression"] == "zstd" and image_col.compression == "ZSTD"
    assert "PLAIN_DICTIONARY" not in image_col.encodings and "RLE_DICTIONARY" not in image_col.encodings
    paths = {p for s in m["shards"] for p in pq.read_table(out / s, columns=["path"]).column("path").to_pylist()}
    assert not any(p.startswith("zz_copy") for p in paths), "the copy goes, the original stays"
    assert all(not p.startswith("/") for p in paths), "paths are stored relative to the input"

    # re-running replaces the output: one shards folder, and a manifest that matches it
    m2 = prepare(PrepareConfig(input=str(messy_folder), output=str(out), image_size=32, crop=1.0,
                               dedupe=False, min_size=16, rows_per_shard=100, compression="none"))
    assert m2["written"] == 23 and "duplicate" not in m2["dropped"]
    assert pq.ParquetFile(out / m2["shards"][0]).metadata.row_group(0).column(0).compression == "UNCOMPRESSED"
    assert len([d for d in out.iterdir() if d.name.startswith("shards-")]) == 1

    # training reads the shards without decoding, with the same hash split
    train, val, stats = load_datasets(str(out), 32, 1.0, 0.2)
    assert stats.train_images + stats.val_images == 23
    assert train.take(1)[0]["image"].shape == (32, 32, 3)


def test_unknown_compression_is_refused_by_name():
    with pytest.raises(ConfigError, match="compression must be one of zstd, none"):
        PrepareConfig(input="in", output="out", compression="gzip2")


def test_unfinished_output_is_never_mistaken_for_data(ray_address, messy_folder, tmp_path):
    out = tmp_path / "half"
    prepare(PrepareConfig(input=str(messy_folder), output=str(out), image_size=32, crop=1.0))
    (out / "manifest.json").unlink()  # as if the job died before finishing
    with pytest.raises(DataError, match="unfinished"):
        load_datasets(str(out), 32, 1.0, 0.2)


def test_manifest_reading_tells_prepared_output_from_anything_else(tmp_path):
    assert read_manifest(str(tmp_path)) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "someone-else/1"}))
    assert read_manifest(str(tmp_path)) is None, "another tool's manifest.json is not ours"
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(str(tmp_path))
    with pytest.raises(DataError, match="cannot open nosuchscheme://x"):
        read_manifest("nosuchscheme://x")


def test_prepare_job_cli_reports_counts(ray_address, messy_folder, tmp_path):
    out = tmp_path / "cli"
    r = run_job(["jobs/prepare_data.py", "--input", str(messy_folder), "--output", str(out),
                 "--image-size", "32", "--crop", "1.0", "--dedupe", "--min-size", "16"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote 20 images" in r.stdout and "duplicate" in r.stdout
    assert json.loads((out / "manifest.json").read_text())["written"] == 20
