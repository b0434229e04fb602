"""jobs/generate.py: bulk catalogues with Ray Data, byte-identical to the Generator, resumable.

Most runs call the library in-process on the shared Ray cluster; one subprocess run of the job
writes to moto's S3 server. 600 galaxies in shards of 256 cross two seed blocks.
"""

import importlib.util
import io
import json
import shutil
import subprocess
import sys

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, job_env
from ray_galaxy.catalogue import (COLUMNS, CatalogueConfig, CatalogueError, complete_shards, generate_catalogue,
                                  plan_of, start_output)
from ray_galaxy.generation.generator import Generator
from ray_galaxy.images import png_bytes

N, SHARD, SEED = 600, 256, 7
SHARDS = ["shard-000000.parquet", "shard-000001.parquet", "shard-000002.parquet"]


def _job():
    spec = importlib.util.spec_from_file_location("generate_job", REPO / "jobs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(model: str, out, **kw) -> CatalogueConfig:
    return CatalogueConfig(**{"model": model, "out": str(out), "n": N, "seed": SEED, "shard_size": SHARD,
                              "num_workers": 1, **kw})


def _pngs(gen: Generator, n: int, seed: int, sampler: str = "auto") -> list[bytes]:
    return [png_bytes(img) for img in gen.images(n, seed, sampler)]


@pytest.fixture(scope="module")
def catalogue(ray_address, models, tmp_path_factory):
    """Model A's catalogue (its GMM sampler, with residual detail) as local Parquet shards."""
    out = tmp_path_factory.mktemp("catalogue") / "cat"
    manifest = generate_catalogue(_config(models.a, out))
    return out, manifest


def test_parquet_catalogue_is_the_generators_galaxies(catalogue, models):
    out, manifest = catalogue
    assert sorted(p.name for p in (out / "shards").iterdir()) == SHARDS
    assert json.loads((out / "manifest.json").read_text()) == manifest
    gen = Generator.load(models.a)
    assert manifest["n"] == N and manifest["seed"] == SEED and manifest["sampler"] == "gmm"
    assert manifest["model_version"] == gen.version and manifest["format"] == "parquet" and manifest["detail"]
    assert [(s["start"], s["count"]) for s in manifest["shards"]] == [(0, 256), (256, 256), (512, 88)]
    table = pq.read_table(out / "shards")
    assert table.column_names == list(COLUMNS)
    rows = table.sort_by("index").to_pydict()
    assert rows["index"] == list(range(N)) and set(rows["seed"]) == {SEED}
    assert set(rows["sampler"]) == {"gmm"} and set(rows["model_version"]) == {gen.version}
    assert rows["label"] == [None] * N
    np.testing.assert_array_equal(np.array(rows["latent"], np.float32), gen.latents(N, SEED).numpy())
    expected = _pngs(gen, N, SEED)
    assert rows["image"] == expected, "the catalogue's PNGs are the Generator's, byte for byte"
    assert len(set(expected)) == N


def test_rerun_generates_only_the_missing_shard_and_writes_the_same_bytes(catalogue, models, tmp_path, capsys):
    src, _ = catalogue
    out = tmp_path / "cat"
    shutil.copytree(src, out)  # copy2: keeps the mtimes
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "shards").iterdir()}
    manifest_bytes = (out / "manifest.json").read_bytes()
    (out / "shards" / SHARDS[1]).unlink()
    (out / "manifest.json").unlink()
    capsys.readouterr()
    generate_catalogue(_config(models.a, out))
    log = capsys.readouterr().out
    assert "2 already written, 1 to generate" in log and "256 generated in 1 shard(s)" in log, log
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "shards").iterdir()}
    assert sorted(after) == SHARDS
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}, "byte-identical"
    assert [k for k in SHARDS if after[k][1] != before[k][1]] == [SHARDS[1]], "only the missing one is rewritten"
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")], "no temporary files left"

    # Another n into the same folder (no generating needed to see it): shards whose length
    # would differ are removed, the others kept.
    start_output(plan_of(_config(models.a, out, n=700))[0])
    assert complete_shards(plan_of(_config(models.a, out, n=700))[0]) == {0, 1}, "the 88-galaxy shard goes"
    start_output(plan_of(_config(models.a, out, n=300))[0])
    assert sorted(p.name for p in (out / "shards").iterdir()) == SHARDS[:1]

    with pytest.raises(CatalogueError, match="seed 7 there, 8 now"):
        generate_catalogue(_config(models.a, out, seed=8))


def test_png_format_writes_one_file_per_galaxy_named_by_index(ray_address, models, tmp_path):
    out = tmp_path / "pngs"
    manifest = generate_catalogue(_config(models.b, out, n=200, shard_size=128, format="png"))
    assert manifest["sampler"] == "prior" and manifest["format"] == "png"  # model B has no sampler
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:08d}.png" for i in range(200)]
    expected = _pngs(Generator.load(models.b), 200, SEED)
    assert [(out / name).read_bytes() for name in names] == expected


def test_job_writes_s3_shards_identical_to_local_ones(catalogue, s3_endpoint, models):
    """One subprocess run of the job (a pool of two actors) into moto's S3: the first shard is the
    local run's bytes."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="catalogues")
    r = subprocess.run([sys.executable, "jobs/generate.py", "--model", models.a, "--n", "300", "--seed", str(SEED),
                        "--shard-size", str(SHARD), "--num-workers", "2", "--out", "s3://catalogues/run1"],
                       cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "galaxies/s" in r.stdout and "ETA" in r.stdout
    assert "core_worker" not in r.stderr and "Warning" not in r.stderr, r.stderr  # Ray kept quiet
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="catalogues", Prefix="run1/")["Contents"])
    assert keys == ["run1/manifest.json", "run1/settings.json",
                    "run1/shards/shard-000000.parquet", "run1/shards/shard-000001.parquet"]
    first = s3.get_object(Bucket="catalogues", Key="run1/shards/shard-000000.parquet")["Body"].read()
    assert first == (catalogue[0] / "shards" / SHARDS[0]).read_bytes()
    last = pq.read_table(io.BytesIO(s3.get_object(Bucket="catalogues", Key="run1/shards/shard-000001.parquet")
                                    ["Body"].read()))
    assert last.column("index").to_pylist() == list(range(256, 300))


def test_bad_inputs_are_clear_errors(ray_address, models, tmp_path, capsys, monkeypatch):
    job = _job()
    assert job.main(["--model", str(tmp_path / "nope"), "--n", "4", "--out", str(tmp_path / "o")]) == 2
    assert "not a finished model directory" in capsys.readouterr().err
    assert job.main(["--model", models.b, "--sampler", "gmm", "--n", "4", "--out", str(tmp_path / "o")]) == 2
    assert "no usable sampler" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        job.main(["--model", models.a, "--n", "0", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "n must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.main(["--model", models.a, "--shard-size", "300", "--out", str(tmp_path / "o")])
    assert "multiple of 256 or a divisor" in capsys.readouterr().err
    # The shared test cluster has no GPU; without RAY_ADDRESS it reads as a Ray of the job's own.
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(CatalogueError, match="local Ray has no GPU"):
        generate_catalogue(_config(models.b, tmp_path / "gpu", n=4, use_gpu=True))
    assert not (tmp_path / "gpu").exists(), "nothing written before the check"
