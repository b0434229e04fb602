"""Object storage: train from s3:// images into s3:// storage and sample from an s3:// model,
against moto's standalone S3 server on loopback (pyarrow's S3 client talks to it for real)."""

import json

import boto3
import pytest

from conftest import REPO, job_env
from test_train_e2e import TINY, run_job


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tiny_folder):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="galaxies")
    for p in sorted(tiny_folder.rglob("*.png")):
        s3.upload_file(str(p), "galaxies", f"raw/{p.relative_to(tiny_folder)}")
    s3.put_object(Bucket="galaxies", Key="raw/broken.jpg", Body=b"not a jpeg")
    return "galaxies"


def test_train_reads_s3_writes_s3_and_sample_reads_it_back(ray_address, bucket, tmp_path):
    r = run_job(["jobs/train.py", "--data", f"s3://{bucket}/raw", "--storage", f"s3://{bucket}/runs",
                 "--name", "s3run", "--epochs", "2", "--num-workers", "1", *TINY])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"model directory: s3://{bucket}/runs/s3run/model" in r.stdout
    s3 = boto3.client("s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/s3run/")["Contents"]}
    for name in ("model.pt", "config.json", "metrics.json", "samples.png", "traversal.png"):
        assert f"runs/s3run/model/{name}" in keys
    assert any("checkpoint_epoch_0002" in k for k in keys), "checkpoints go to s3 storage too"
    metrics = json.loads(s3.get_object(Bucket=bucket, Key="runs/s3run/model/metrics.json")["Body"].read())
    assert metrics["data"]["skipped"] == 1 and metrics["data"]["files"] == 41
    out = tmp_path / "samples"
    r = run_job(["jobs/sample.py", "--model", f"s3://{bucket}/runs/s3run/model", "--n", "3", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("sample_*.png"))) == 3


def test_missing_bucket_is_one_clear_error(s3_endpoint):
    from ray_galaxy.data import DataError, list_images

    with pytest.raises(DataError, match="no-such-bucket"):
        list_images("s3://no-such-bucket/raw")


def test_unreachable_endpoint_fails_fast_with_a_clear_error(s3_endpoint, monkeypatch):
    import time

    from conftest import free_port
    from ray_galaxy.data import DataError, list_images

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    t0 = time.time()
    with pytest.raises(DataError) as e:
        list_images("s3://galaxies/raw")
    assert time.time() - t0 < 30
    assert "s3://galaxies/raw" in str(e.value) and "connect" in str(e.value).lower()


def test_prepare_into_s3_shards_then_train_from_them(ray_address, bucket, tmp_path):
    """The issue's whole S3 path: raw s3:// pictures -> s3:// shards -> train -> s3:// model."""
    r = run_job(["jobs/prepare_data.py", "--input", f"s3://{bucket}/raw", "--output", f"s3://{bucket}/shards",
                 "--image-size", "48", "--crop", "1.0", "--dedupe", "--min-size", "16"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s3 = boto3.client("s3")
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="shards/manifest.json")["Body"].read())
    assert manifest["read"] == 41 and manifest["written"] == 40
    assert manifest["dropped"] == {"unreadable": 1}
    r = run_job(["jobs/train.py", "--data", f"s3://{bucket}/shards", "--storage", f"s3://{bucket}/runs",
                 "--name", "from-shards", "--epochs", "2", *TINY])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "data: " in r.stdout and "skipped 0" in r.stdout
    metrics = json.loads(s3.get_object(Bucket=bucket, Key="runs/from-shards/model/metrics.json")["Body"].read())
    assert metrics["data"]["train_images"] + metrics["data"]["val_images"] == 40
    out = tmp_path / "s"
    r = run_job(["jobs/sample.py", "--model", f"s3://{bucket}/runs/from-shards/model", "--n", "2", "--out", str(out)])
    assert r.returncode == 0, r.stderr
