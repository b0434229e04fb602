"""Object storage: train from s3:// images into s3:// storage and sample from an s3:// model,
against moto's standalone S3 server on loopback (pyarrow's S3 client talks to it for real)."""

import json
import time

import boto3
import pytest

from conftest import free_port
from ray_galaxy.data import DataError, list_images
from ray_galaxy.imageset import read_image_set
from ray_galaxy.storage import read_bytes, write_bytes
from ray_galaxy.streaming import load_datasets
from test_train_e2e import TINY, run_job


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tiny_folder):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="galaxies")
    for p in sorted(tiny_folder.rglob("*.png")):
        s3.upload_file(str(p), "galaxies", f"raw/{p.relative_to(tiny_folder)}")
    s3.put_object(Bucket="galaxies", Key="raw/broken.jpg", Body=b"not a jpeg")
    return "galaxies"


def test_raw_s3_images_are_read_and_a_broken_one_is_skipped_and_counted(ray_address, bucket):
    """Ray Data reads s3:// pictures through pyarrow's S3 client (no job: the training job on
    s3:// data is the next test's, from shards)."""
    train, val, stats = load_datasets(f"s3://{bucket}/raw", 32, 1.0, 0.2)
    assert stats.files == 41 and stats.skipped == 1 and "unreadable" in stats.skipped_by_reason
    assert stats.train_images + stats.val_images == 40
    assert train.count() == stats.train_images and val.count() == stats.val_images
    assert train.take_batch(2)["image"].shape == (2, 32, 32, 3)


def test_two_s3_prefixes_are_one_training_source_and_one_image_set(ray_address, bucket, tiny_folder):
    s3 = boto3.client("s3")
    for p in sorted(tiny_folder.glob("*.png"))[:6]:
        s3.upload_file(str(p), bucket, f"extra/{p.name}")
    spec = f"s3://{bucket}/raw,s3://{bucket}/extra"
    train, val, stats = load_datasets(spec, 32, 1.0, 0.2)
    alone = load_datasets(f"s3://{bucket}/extra", 32, 1.0, 0.2)[2]
    assert stats.files == 47 and stats.skipped == 1
    assert stats.train_images + stats.val_images == 46 and train.count() == stats.train_images
    found = read_image_set(spec, 32, 1.0, split="train", val_fraction=0.2)
    assert len(found.images) == stats.train_images and found.info["skipped"] == 1
    assert sum(p.startswith(f"{bucket}/extra/") for p in found.paths) == alone.train_images
    with pytest.raises(DataError, match="different filesystems"):
        load_datasets(f"{spec},{tiny_folder}", 32, 1.0, 0.2)


def test_missing_bucket_is_one_clear_error(s3_endpoint):
    with pytest.raises(DataError, match="no-such-bucket"):
        list_images("s3://no-such-bucket/raw")


def test_unreachable_endpoint_fails_fast_with_a_clear_error(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    t0 = time.time()
    with pytest.raises(DataError) as e:
        list_images("s3://galaxies/raw")
    assert time.time() - t0 < 30
    assert "s3://galaxies/raw" in str(e.value) and "connect" in str(e.value).lower()


def test_prepare_into_s3_shards_then_train_from_them(ray_address, bucket, tmp_path):
    """The issue's whole S3 path: raw s3:// pictures -> s3:// shards -> train (checkpoints and
    model directory in s3:// storage) -> jobs/sample.py reads the s3:// model back."""
    r = run_job(["jobs/prepare_data.py", "--input", f"s3://{bucket}/raw", "--output", f"s3://{bucket}/shards",
                 "--image-size", "48", "--crop", "1.0", "--dedupe", "--min-size", "16"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s3 = boto3.client("s3")
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="shards/manifest.json")["Body"].read())
    assert manifest["read"] == 41 and manifest["written"] == 40
    assert manifest["dropped"] == {"unreadable": 1}
    r = run_job(["jobs/train.py", "--data", f"s3://{bucket}/shards", "--storage", f"s3://{bucket}/runs",
                 "--name", "from-shards", "--epochs", "2", "--no-tracking", *TINY])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "data: " in r.stdout and f"model directory: s3://{bucket}/runs/from-shards/model" in r.stdout
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/from-shards/")["Contents"]}
    for name in ("model.pt", "config.json", "metrics.json", "samples.png", "traversal.png"):
        assert f"runs/from-shards/model/{name}" in keys
    assert any("checkpoint_epoch_0002" in k for k in keys), "checkpoints go to s3 storage too"
    metrics = json.loads(s3.get_object(Bucket=bucket, Key="runs/from-shards/model/metrics.json")["Body"].read())
    assert metrics["data"]["train_images"] + metrics["data"]["val_images"] == 40
    assert metrics["data"]["files"] == 40
    out = tmp_path / "s"
    r = run_job(["jobs/sample.py", "--model", f"s3://{bucket}/runs/from-shards/model", "--n", "3", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("*.png"))) == 3


class FlakyS3Proxy:
    """An S3 endpoint on loopback in front of the moto server where every kind of request
    (method, key, query parameter names) first gets ``failures_per_kind`` transient 503
    SlowDown answers, and is forwarded after that: a store throttling for a while, in a
    schedule no retry pattern can dodge by luck."""

    def __init__(self, upstream: str, failures_per_kind: int = 1) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        up = urlparse(upstream)
        proxy = self
        self.seen = self.failed = 0
        self.kinds: dict = {}
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        body += self.rfile.read(size)
                        self.rfile.readline()  # the CRLF after each chunk (and after the last)
                        if size == 0:
                            break
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else b""
                from urllib.parse import parse_qsl, urlsplit

                url = urlsplit(self.path)
                kind = (self.command, url.path, tuple(sorted(k for k, _ in parse_qsl(url.query, True))))
                with proxy._lock:
                    proxy.seen += 1
                    fail = proxy.kinds.get(kind, 0) < failures_per_kind
                    proxy.kinds[kind] = proxy.kinds.get(kind, 0) + 1
                    proxy.failed += fail
                if fail:
                    err = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                           b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err if self.command != "HEAD" else b"")
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive", "proxy-connection", "expect",
                                                "transfer-encoding", "content-length")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(k, v)
                # A HEAD answer has no body but tells the object's size.
                self.send_header("Content-Length", resp.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("failures", [1, 6])
def test_transient_errors_are_retried(s3_endpoint, bucket, monkeypatch, failures):
    """Every S3 request first fails with 503 SlowDown, once or six times in a row: listing,
    reading and writing (a multipart upload: create, part, complete) still work and nothing is
    lost. pyarrow's S3 client retries these itself (AWS standard retry with backoff)."""

    direct = list_images(f"s3://{bucket}/raw")
    proxy = FlakyS3Proxy(s3_endpoint, failures)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        assert list_images(f"s3://{bucket}/raw") == direct and len(direct) == 41
        payload = bytes(range(256)) * 512
        write_bytes(f"s3://{bucket}/flaky{failures}/blob.bin", payload)
        assert read_bytes(f"s3://{bucket}/flaky{failures}/blob.bin") == payload
        png = next(p for p in direct if p.endswith(".png"))
        assert read_bytes(f"s3://{png}")[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        proxy.close()
    assert proxy.failed >= 5 and proxy.seen > proxy.failed  # list, create, part, complete, get
    obj = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=bucket, Key=f"flaky{failures}/blob.bin")["Body"].read()
    assert obj == payload
