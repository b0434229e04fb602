"""Serving galaxies selected by property (``where=``) over real HTTP, and /info's property ranges.

The session's model A (its sampler fitted on 48 synthetic galaxies, properties kept) serves;
what it answers is compared byte for byte with jobs/sample.py run in this process.
"""

import io
import zipfile

import numpy as np
import pytest
import requests

from conftest import REPO
from ray_galaxy.generation.generator import Generator
from ray_galaxy.generation.properties import PROPERTY_NAMES


def _sample_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_job", REPO / "jobs" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def info(server) -> dict:
    return requests.get(server.url + "/info", timeout=30).json()


def test_info_lists_the_properties_with_their_training_ranges(info, models):
    ranges = info["properties"]
    assert list(ranges) == list(PROPERTY_NAMES) and info["sampler"]["properties"] == list(PROPERTY_NAMES)
    assert ranges == Generator.load(models.a).property_ranges()
    for name, r in ranges.items():
        assert r["measured"] == 48 and r["min"] <= r["median"] <= r["max"], name
    assert ranges["r50_px"]["unit"] == "px" and ranges["r50_px"]["min"] < ranges["r50_px"]["max"]


def test_where_gives_the_bytes_of_jobs_sample(server, models, info, tmp_path):
    where = f"r50_px >= {info['properties']['r50_px']['median']} and ellipticity >= 0"
    out = tmp_path / "out"
    assert _sample_job().main(["--model", models.a, "--n", "3", "--seed", "3", "--out", str(out), "--where", where]) == 0
    written = [(out / f"sample_{i:05d}.png").read_bytes() for i in range(3)]
    one = requests.get(server.url + "/sample", params={"seed": 3, "where": where}, timeout=30)
    assert one.status_code == 200 and one.content == written[0]
    assert one.content != requests.get(server.url + "/sample", params={"seed": 3}, timeout=30).content
    z = requests.post(server.url + "/sample", json={"n": 3, "seed": 3, "where": where, "format": "zip"}, timeout=30)
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        assert [zf.read(f"galaxy_{i:02d}.png") for i in range(3)] == written
    body = requests.get(server.url + "/latent", params={"seed": 3, "where": where}, timeout=30).json()
    assert body["where"] == where
    np.testing.assert_array_equal(np.float32(body["z"]), Generator.load(models.a).latents(1, 3, where=where)[0].numpy())


@pytest.mark.parametrize("params,problem", [
    ({"where": "size > 2"}, "unknown property 'size'"),
    ({"where": "__import__('os').system('x')"}, "(a function call) is not allowed"),
    ({"where": "r50_px.__class__"}, "(an attribute) is not allowed"),
    ({"where": ""}, "it is empty"),
    ({"where": "r50_px > 1" * 300}, "characters, more than the 500 allowed"),
    ({"where": "r50_px > 99"}, "0 of the 48 training galaxies match (0 kernels), fewer than the 20"),
    ({"where": "r50_px > 0", "sampler": "prior"}, "needs the fitted sampler"),
], ids=["unknown", "call", "attribute", "empty", "long", "too-few", "prior"])
def test_a_bad_or_too_narrow_where_is_422_saying_why(server, params, problem):
    for r in (requests.get(server.url + "/sample", params=params, timeout=30),
              requests.post(server.url + "/sample", json={"n": 2, **params}, timeout=30)):
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["field"] == "where" and problem in body["error"], body
