"""Ray Serve app (ray_galaxy/serve/) over real HTTP on a loopback port of the shared cluster.

Two tiny models (32px; latent 4 and 6) are trained for a few plain-torch steps in a fixture.
Serve runs two applications of model A: ``/galaxy`` without a token and ``/auth`` with one;
the swap test deploys a third with A and redeploys it with B (another latent size) under load.
Images are compared byte for byte with the model decoded in this process (the Generator that
jobs/sample.py uses), which the float64 decoder makes exact however requests were batched.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from conftest import REPO, job_env
from serving import (BODY_LIMIT, LATENT, MAX_BATCH, SIZE, SMALL, TOKEN, default_images, default_latents,
                     expected_images, expected_png, galaxy_png, pixels, seed_latents, tile)

# Ray Serve's own models use a pydantic idiom deprecated in pydantic 2 (not ours to fix).
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

SERVE_YAML = REPO / "cluster" / "serve.yaml"


# --------------------------------------------------------------------------- endpoints


def version_of(uri: str) -> str:
    from ray_galaxy.checkpoint import load_model_dir

    return load_model_dir(uri, weights=False).version


def test_healthz_info_and_docs(server, models):
    assert requests.get(server.url + "/healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(server.url + "/info", timeout=30).json()
    assert info["version"] == version_of(models.a) != version_of(models.b)
    assert info["model"] == models.a
    assert (info["latent_dim"], info["image_size"]) == (LATENT, SIZE)
    assert info["model_config"]["channels"] == [8, 16, 32, 32]
    assert info["metrics"]["best_epoch"] == 1 and info["metrics"]["best"]["val_psnr"] == 12.5
    assert info["traverse_dims"] == [1, 3]  # most KL per dim
    assert info["serving"]["max_batch_size"] == MAX_BATCH and info["serving"]["auth"] is False
    docs = requests.get(server.url + "/docs", timeout=30)
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    paths = requests.get(server.url + "/openapi.json", timeout=30).json()["paths"]
    assert {"/sample", "/interpolate", "/traverse", "/reconstruct", "/info", "/healthz"} <= set(paths)
    assert "multipart/form-data" in paths["/reconstruct"]["post"]["requestBody"]["content"]


def test_get_sample_is_byte_identical_by_seed(server, models):
    r1 = requests.get(server.url + "/sample", params={"seed": 7}, timeout=30)
    r2 = requests.get(server.url + "/sample?seed=7", timeout=30)
    assert r1.status_code == 200 and r1.headers["content-type"] == "image/png"
    assert r1.headers["x-model-version"] == requests.get(server.url + "/info", timeout=30).json()["version"]
    assert r1.content == r2.content == expected_png(models, 7)
    assert pixels(r1.content).shape == (SIZE, SIZE, 3)
    other = requests.get(server.url + "/sample?seed=8", timeout=30).content
    cool = requests.get(server.url + "/sample?seed=7&temperature=0.5", timeout=30).content
    assert other != r1.content and cool != r1.content
    assert cool == expected_png(models, 7, 0.5)


def test_post_sample_grid_zip_npy(server, models):
    from ray_galaxy.images import grid, png_bytes

    want = default_images(models, 5, 3, 0.8)
    body = {"n": 5, "seed": 3, "temperature": 0.8}
    g = requests.post(server.url + "/sample", json=body, timeout=30)
    assert g.status_code == 200 and g.headers["content-type"] == "image/png"
    assert g.content == png_bytes(grid(want))
    z = requests.post(server.url + "/sample", json={**body, "format": "zip"}, timeout=30)
    assert z.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        names = sorted(zf.namelist())
        assert names == [f"galaxy_{i:02d}.png" for i in range(5)]
        assert [zf.read(n) for n in names] == [png_bytes(im) for im in want]
    npy = requests.post(server.url + "/sample", json={**body, "format": "npy"}, timeout=30)
    arr = np.load(io.BytesIO(npy.content), allow_pickle=False)
    assert arr.dtype == np.uint8 and arr.shape == (5, SIZE, SIZE, 3)
    np.testing.assert_array_equal(arr, want)
    # n larger than the decoder's batch is split into chunks and decoded beside other work:
    # still exactly what the Generator gives in this process.
    big = requests.post(server.url + "/sample", json={"n": 64, "seed": 11, "format": "npy"}, timeout=60)
    arr = np.load(io.BytesIO(big.content))
    np.testing.assert_array_equal(arr, default_images(models, 64, 11))  # detail drawn across chunks


def test_interpolate_slerp_strip(server, models):
    r = requests.post(server.url + "/interpolate", json={"from": 1, "to": 2, "steps": 5}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    strip = pixels(r.content)
    assert strip.shape == (SIZE + 4, 5 * (SIZE + 2) + 2, 3)
    assert np.array_equal(tile(strip, 0), pixels(expected_png(models, 1, detail=False)))  # codes decode to means
    assert np.array_equal(tile(strip, 4), pixels(expected_png(models, 2, detail=False)))
    vec = requests.post(server.url + "/interpolate",
                        json={"from": [0.5, -1.0, 0.0, 2.0], "to": 4, "steps": 3, "temperature": 0.7}, timeout=30)
    assert vec.status_code == 200 and pixels(vec.content).shape[1] == 3 * (SIZE + 2) + 2


def test_slerp_properties():
    """The slerp /interpolate and the explorer use (generation.latents)."""
    import torch

    from ray_galaxy.generation.latents import slerp

    a, b = np.array([1.0, 0.0, 0.0, 0.0]), np.array([0.0, 2.0, 0.0, 0.0])
    assert slerp(a, b, 5).dtype == torch.float32
    path = slerp(a, b, 5).numpy()
    assert path.shape == (5, 4)
    assert np.array_equal(path[0], a.astype(np.float32)) and np.array_equal(path[-1], b.astype(np.float32))
    mid = path[2].astype(np.float64)
    assert np.linalg.norm(mid) > np.linalg.norm((a + b) / 2)  # on the arc, not the chord
    assert np.allclose(slerp(a, a, 3).numpy(), np.repeat(a[None], 3, 0))  # parallel: straight line, no NaN
    assert np.isfinite(slerp(a, -a, 4).numpy()).all() and np.isfinite(slerp(np.zeros(4), b, 4).numpy()).all()


def test_traverse_grid(server, models):
    import torch

    from ray_galaxy.generation.latents import traversal_latents
    from ray_galaxy.images import grid, png_bytes

    default = requests.get(server.url + "/traverse", timeout=60)
    assert default.status_code == 200
    z = traversal_latents(torch.zeros(LATENT), (1, 3), 8, 3.0)
    assert default.content == png_bytes(grid(expected_images(models.model_a, z), ncols=8))
    small = requests.get(server.url + "/traverse?dims=0,2&steps=3&range=2", timeout=30)
    z = traversal_latents(torch.zeros(LATENT), (0, 2), 3, 2.0)
    assert small.content == png_bytes(grid(expected_images(models.model_a, z), ncols=3))


def test_traverse_around_a_center(server, models):
    import torch

    from ray_galaxy.generation.latents import traversal_latents
    from ray_galaxy.images import grid, png_bytes

    center = [0.5, -1.25, 2.0, 0.125]
    r = requests.get(server.url + "/traverse", params={"dims": "0,2", "steps": 3, "center": ",".join(map(str, center))},
                     timeout=30)
    z = traversal_latents(torch.tensor(center), (0, 2), 3, 3.0)
    assert r.status_code == 200 and r.content == png_bytes(grid(expected_images(models.model_a, z), ncols=3))
    assert (z[:, 1] == -1.25).all() and (z[:, 3] == 0.125).all()  # the other dims stay at the center


def test_latent_and_decode(server, models):
    """The explorer's two calls: a seed's code, and any code decoded: together they equal GET /sample."""
    body = requests.get(server.url + "/latent", params={"seed": 7, "temperature": 0.5}, timeout=30).json()
    assert body["sampler"] == "gmm" and body["version"] == requests.get(server.url + "/info", timeout=30).json()["version"]
    np.testing.assert_array_equal(np.float32(body["z"]), default_latents(models, 1, 7, 0.5)[0].numpy())
    png = requests.post(server.url + "/decode", json={"z": body["z"]}, timeout=30)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == expected_png(models, 7, 0.5, detail=False) == \
        requests.get(server.url + "/sample?seed=7&temperature=0.5&detail=false", timeout=30).content
    drawn = requests.get(server.url + "/sample?seed=7&temperature=0.5", timeout=30).content
    assert drawn == expected_png(models, 7, 0.5) != png.content  # /sample adds the residual detail


def test_gmm_sampler_is_served(server, models):
    from ray_galaxy.images import grid, png_bytes

    info = requests.get(server.url + "/info", timeout=30).json()
    assert info["samplers"] == ["prior", "gmm"] and info["sampler"]["components"] == 2
    assert info["sampler"]["kernels"] == "codes" and info["sampler"]["bandwidth"] > 0  # draws around the codes
    z = seed_latents(models, 3, 5, "gmm", 0.8)
    assert not np.allclose(z.numpy(), seed_latents(models, 3, 5, "prior", 0.8).numpy())
    z1 = seed_latents(models, 1, 5, "gmm", 0.8)
    latent = requests.get(server.url + "/latent?seed=5&temperature=0.8&sampler=gmm", timeout=30).json()["z"]
    np.testing.assert_array_equal(np.float32(latent), z1[0].numpy())
    one = requests.get(server.url + "/sample?seed=5&temperature=0.8&sampler=gmm&detail=false", timeout=30)
    assert one.content == png_bytes(expected_images(models.model_a, z1)[0])
    many = requests.post(server.url + "/sample", json={"n": 3, "seed": 5, "temperature": 0.8, "sampler": "gmm",
                                                       "detail": False}, timeout=30)
    assert many.content == png_bytes(grid(expected_images(models.model_a, z)))
    drawn = requests.post(server.url + "/sample", json={"n": 3, "seed": 5, "temperature": 0.8, "sampler": "gmm"},
                          timeout=30)
    assert drawn.content == png_bytes(grid(default_images(models, 3, 5, 0.8))) != many.content
    # No sampler given: 'auto' serves the GMM of a model that has one; 'prior' stays available.
    assert requests.get(server.url + "/sample?seed=5&temperature=0.8&detail=0", timeout=30).content == one.content
    prior = requests.get(server.url + "/sample?seed=5&temperature=0.8&sampler=prior", timeout=30)
    assert prior.content == png_bytes(expected_images(models.model_a, seed_latents(models, 1, 5, "prior", 0.8))[0])
    assert prior.content != one.content


def test_explorer_files_are_served(server):
    page = requests.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<base href="/galaxy/">' in page.text  # relative URLs resolve under the route prefix
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = requests.get(server.url + "/explorer/" + name, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 500
        assert "http://" not in r.text and "https://" not in r.text  # works offline: no CDN


def test_reconstruct_upload(server):
    from synthetic import jpeg_bytes

    png = galaxy_png()
    form = requests.post(server.url + "/reconstruct", files={"file": ("g.png", png, "image/png")}, timeout=30)
    assert form.status_code == 200 and form.headers["content-type"] == "image/png"
    assert pixels(form.content).shape == (SIZE, SIZE, 3)
    raw = requests.post(server.url + "/reconstruct", data=png, headers={"content-type": "image/png"}, timeout=30)
    assert raw.status_code == 200 and raw.content == form.content
    jpg = jpeg_bytes(np.asarray(pixels(galaxy_png(64, 9))))
    r = requests.post(server.url + "/reconstruct?crop=0.5", files={"file": ("g.jpg", jpg, "image/jpeg")}, timeout=30)
    assert r.status_code == 200 and pixels(r.content).shape == (SIZE, SIZE, 3)


def test_serve_bytes_equal_jobs_sample(server, models, tmp_path):
    """A seed's galaxies from Serve are the PNGs jobs/sample.py writes for it (figures.write_samples
    on the same Generator), pixel for pixel, for GET and POST /sample and either sampler."""
    from ray_galaxy.figures import write_samples
    from ray_galaxy.generation.generator import Generator

    gen = Generator.load(models.a)
    for sampler in ("auto", "prior"):
        out = tmp_path / sampler
        write_samples(gen, str(out), 5, seed=3, sampler=sampler)
        written = [pixels((out / f"sample_{i:05d}.png").read_bytes()) for i in range(5)]
        one = requests.get(server.url + "/sample", params={"seed": 3, "sampler": sampler}, timeout=30)
        assert one.status_code == 200 and np.array_equal(pixels(one.content), written[0])
        z = requests.post(server.url + "/sample", json={"n": 5, "seed": 3, "sampler": sampler, "format": "zip"},
                          timeout=30)
        with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
            served = [pixels(zf.read(f"galaxy_{i:02d}.png")) for i in range(5)]
        assert all(np.array_equal(a, b) for a, b in zip(served, written)), sampler


def test_multipart_uploads(server):
    """Forms are parsed by python-multipart: the image as 'file' or 'image', beside other fields;
    a form that cannot be parsed is a 4xx naming the file, never a 5xx."""
    png = galaxy_png()
    want = requests.post(server.url + "/reconstruct", data=png, headers={"content-type": "image/png"},
                         timeout=30).content
    for files, data in (({"file": ("g.png", png, "image/png")}, None),
                        ({"image": ("g.png", png)}, None),
                        ({"file": ("g.png", png)}, {"note": "a text field first"})):
        r = requests.post(server.url + "/reconstruct", files=files, data=data, timeout=30)
        assert r.status_code == 200 and r.content == want, (files.keys(), r.text[:200])
    malformed = [("multipart/form-data", b"--x\r\nno boundary given\r\n--x--\r\n"),
                 ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--zz--\r\n"),
                 ("multipart/form-data; boundary=zz", b"--zz\r\nnot a header line at all")]
    for ctype, body in malformed:
        r = requests.post(server.url + "/reconstruct", data=body, headers={"content-type": ctype}, timeout=30)
        assert 400 <= r.status_code < 500 and r.json()["field"] == "file", (ctype, body, r.status_code, r.text)


# --------------------------------------------------------------------------- bad input


def _json(raw: str) -> dict:
    return {"data": raw, "headers": {"content-type": "application/json"}}


BIG = b"\x89PNG" + b"\0" * (BODY_LIMIT + 10)

BAD = [
    # (id, method, path, request kwargs, status, field)
    ("seed-negative", "get", "/sample?seed=-1", {}, 422, "seed"),
    ("seed-text", "get", "/sample?seed=abc", {}, 422, "seed"),
    ("seed-huge", "get", f"/sample?seed={2 ** 64}", {}, 422, "seed"),
    ("temperature-nan", "get", "/sample?temperature=nan", {}, 422, "temperature"),
    ("temperature-inf", "get", "/sample?temperature=inf", {}, 422, "temperature"),
    ("temperature-negative", "get", "/sample?temperature=-1", {}, 422, "temperature"),
    ("unknown-query", "get", "/sample?sed=3", {}, 422, "sed"),
    ("n-zero", "post", "/sample", {"json": {"n": 0}}, 422, "n"),
    ("n-too-many", "post", "/sample", {"json": {"n": 65}}, 422, "n"),
    ("n-text", "post", "/sample", {"json": {"n": "lots"}}, 422, "n"),
    ("n-fraction", "post", "/sample", {"json": {"n": 2.5}}, 422, "n"),
    ("format-unknown", "post", "/sample", {"json": {"format": "gif"}}, 422, "format"),
    ("temperature-nan-json", "post", "/sample", _json('{"temperature": NaN}'), 422, "temperature"),
    ("seed-float-json", "post", "/sample", {"json": {"seed": 1.5}}, 422, "seed"),
    ("unknown-key", "post", "/sample", {"json": {"nn": 3}}, 422, "nn"),
    ("not-json", "post", "/sample", _json("not json"), 422, "body"),
    ("json-array", "post", "/sample", {"json": [1, 2]}, 422, "body"),
    ("latent-too-short", "post", "/interpolate", {"json": {"from": [0.1, 0.2], "to": 3}}, 422, "from"),
    ("latent-too-long", "post", "/interpolate", {"json": {"from": 1, "to": [0.0] * 5}}, 422, "to"),
    ("latent-text", "post", "/interpolate", {"json": {"from": 1, "to": [1, 2, 3, "x"]}}, 422, "to"),
    ("latent-inf", "post", "/interpolate", _json('{"from": 1, "to": [Infinity, 0, 0, 0]}'), 422, "to"),
    ("latent-nan", "post", "/interpolate", _json('{"from": [0, NaN, 0, 0], "to": 1}'), 422, "from"),
    ("latent-huge", "post", "/interpolate", {"json": {"from": [1e300, 0, 0, 0], "to": 1}}, 422, "from"),
    ("from-missing", "post", "/interpolate", {"json": {"to": 2}}, 422, "from"),
    ("from-seed-huge", "post", "/interpolate", {"json": {"from": 2 ** 70, "to": 1}}, 422, "from"),
    ("steps-one", "post", "/interpolate", {"json": {"from": 1, "to": 2, "steps": 1}}, 422, "steps"),
    ("steps-many", "post", "/interpolate", {"json": {"from": 1, "to": 2, "steps": 33}}, 422, "steps"),
    ("dims-one", "get", "/traverse?dims=0", {}, 422, "dims"),
    ("dims-same", "get", "/traverse?dims=1,1", {}, 422, "dims"),
    ("dims-out-of-range", "get", "/traverse?dims=0,4", {}, 422, "dims"),
    ("dims-text", "get", "/traverse?dims=a,b", {}, 422, "dims"),
    ("traverse-steps", "get", "/traverse?steps=1", {}, 422, "steps"),
    ("range-zero", "get", "/traverse?range=0", {}, 422, "range"),
    ("range-nan", "get", "/traverse?range=nan", {}, 422, "range"),
    ("upload-text", "post", "/reconstruct", {"files": {"file": ("notes.png", b"hello, not an image")}}, 422, "file"),
    ("upload-empty", "post", "/reconstruct", {"files": {"file": ("e.png", b"")}}, 422, "file"),
    ("upload-no-file-part", "post", "/reconstruct", {"data": {"name": "x"}, "files": {"other": ("", b"")}}, 422, "file"),
    ("upload-nothing", "post", "/reconstruct", {}, 422, "file"),
    ("upload-json", "post", "/reconstruct", {"json": {"file": "x"}}, 415, "file"),
    ("upload-tiny-image", "post", "/reconstruct", {"files": {"file": ("t.png", "TINY")}}, 422, "file"),
    ("upload-crop", "post", "/reconstruct?crop=1.5", {"files": {"file": ("g.png", "GALAXY")}}, 422, "crop"),
    ("upload-too-large", "post", "/reconstruct", {"data": BIG, "headers": {"content-type": "image/png"}}, 413, "body"),
    ("upload-too-large-chunked", "post", "/reconstruct",
     {"data": "chunks", "headers": {"content-type": "image/png"}}, 413, "body"),
    ("json-too-large", "post", "/sample", _json('{"n": 1, "pad": "' + "x" * BODY_LIMIT + '"}'), 413, "body"),
    ("sampler-unknown", "get", "/sample?sampler=flow", {}, 422, "sampler"),
    ("sampler-unknown-json", "post", "/sample", {"json": {"sampler": "vamp"}}, 422, "sampler"),
    ("latent-sampler-unknown", "get", "/latent?sampler=x", {}, 422, "sampler"),
    ("latent-seed-negative", "get", "/latent?seed=-3", {}, 422, "seed"),
    ("decode-short", "post", "/decode", {"json": {"z": [0.0, 1.0]}}, 422, "z"),
    ("decode-nan", "post", "/decode", _json('{"z": [0, NaN, 0, 0]}'), 422, "z"),
    ("decode-huge", "post", "/decode", {"json": {"z": [0, 0, 1e9, 0]}}, 422, "z"),
    ("decode-missing", "post", "/decode", {"json": {}}, 422, "z"),
    ("decode-extra-key", "post", "/decode", {"json": {"z": [0, 0, 0, 0], "seed": 1}}, 422, "seed"),
    ("center-short", "get", "/traverse?center=1,2", {}, 422, "center"),
    ("center-text", "get", "/traverse?center=a,b,c,d", {}, 422, "center"),
    ("center-inf", "get", "/traverse?center=0,inf,0,0", {}, 422, "center"),
    ("model-unknown", "get", "/sample?model=b", {}, 422, "model"),
    ("model-empty", "get", "/info?model=", {}, 422, "model"),
    ("model-unknown-json", "post", "/sample", {"json": {"model": "b"}}, 422, "model"),
    ("model-not-text-json", "post", "/decode", {"json": {"z": [0, 0, 0, 0], "model": 3}}, 422, "model"),
    ("models-unknown-query", "get", "/models?model=a", {}, 422, "model"),
    ("explorer-file-unknown", "get", "/explorer/secrets.txt", {}, 404, "name"),
    ("explorer-file-traversal", "get", "/explorer/..%2Fserve.py", {}, 404, None),
    ("no-route", "get", "/nope", {}, 404, None),
    ("wrong-method", "delete", "/sample", {}, 405, None),
]


@pytest.mark.parametrize("method,path,kwargs,status,field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_4xx_naming_the_field(server, method, path, kwargs, status, field):
    kwargs = dict(kwargs)
    images = {"TINY": lambda: galaxy_png(4), "GALAXY": galaxy_png}  # 4px is below the minimum
    if "files" in kwargs:
        kwargs["files"] = {k: (name, images[v]() if isinstance(v, str) else v)
                           for k, (name, v) in kwargs["files"].items()}
    if kwargs.get("data") == "chunks":  # no Content-Length: counted while it streams in
        kwargs["data"] = (b"\0" * 16384 for _ in range(8))
    r = requests.request(method, server.url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field and isinstance(body["error"], str) and body["error"]


def test_32_concurrent_requests_all_succeed_and_batch(server, models):
    from ray import serve

    seeds = list(range(100, 132))
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda s: requests.get(server.url + f"/sample?seed={s}", timeout=60), seeds))
    assert [r.status_code for r in responses] == [200] * 32
    assert [r.content for r in responses] == [expected_png(models, s) for s in seeds]
    stats = serve.get_deployment_handle("Decoder", app_name="galaxy").stats.remote().result(timeout_s=30)
    assert stats["max_calls"] > 1, stats  # requests were decoded together
    assert stats["max_rows"] <= MAX_BATCH


# --------------------------------------------------------------------------- token


def test_bearer_token(server):
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(server.auth + "/healthz", timeout=30).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": "Bearer "}):
        for path in ("/info", "/sample?seed=1", "/docs", "/openapi.json", "/nope"):
            r = requests.get(server.auth + path, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.json()["field"] == "authorization" and r.headers["www-authenticate"] == "Bearer"
    r = requests.post(server.auth + "/sample", json={"n": 2}, timeout=30)
    assert r.status_code == 401
    assert requests.get(server.auth + "/info", headers=ok, timeout=30).json()["serving"]["auth"] is True
    assert requests.get(server.auth + "/sample?seed=1", headers=ok, timeout=30).content == \
        requests.get(server.url + "/sample?seed=1", timeout=30).content  # token off on /galaxy
    assert requests.post(server.auth + "/sample", json={"n": 2}, headers=ok, timeout=30).status_code == 200


def test_token_is_not_logged(server):
    import ray

    requests.get(server.auth + "/info", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaked == []


# --------------------------------------------------------------------------- model swap


def test_model_swap_drops_no_requests(server, models):
    from ray import serve

    from ray_galaxy.serve.app import build_app

    url = server.base + "/swap"
    version_a, version_b = version_of(models.a), version_of(models.b)
    serve.run(build_app({**server.args, "model": models.a}, SMALL, token=None), name="swap", route_prefix="/swap")
    assert requests.get(url + "/info", timeout=30).json()["version"] == version_a

    failures, seen, stop = [], [], threading.Event()

    def hammer(worker: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if i % 4 == 0:
                    r = requests.get(url + "/info", timeout=60)
                    ok = r.status_code == 200 and r.json()["version"] in (version_a, version_b)
                    version = r.json().get("version") if ok else None
                else:
                    r = requests.get(url + f"/sample?seed={worker * 1000 + i}", timeout=60)
                    version = r.headers.get("x-model-version")
                    ok = r.status_code == 200 and r.headers["content-type"] == "image/png"
                if not ok:
                    failures.append((r.status_code, r.text[:200]))
                seen.append((time.monotonic(), version))
            except Exception as e:  # noqa: BLE001 - a dropped connection is a failure too
                failures.append(repr(e))

    threads = [threading.Thread(target=hammer, args=(w,), daemon=True) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        redeploy = time.monotonic()
        serve.run(build_app({**server.args, "model": models.b}, SMALL, token=None), name="swap", route_prefix="/swap")
        swapped = time.monotonic()
        deadline = swapped + 60
        while time.monotonic() < deadline and not any(t > swapped and v == version_b for t, v in seen):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    try:
        assert failures == []
        during = [v for t, v in seen if redeploy <= t <= swapped]
        assert len(during) >= 10, f"only {len(during)} requests answered while the swap rolled out"
        versions = [v for _, v in seen]
        assert version_a in versions and version_b in versions
        info = requests.get(url + "/info", timeout=30).json()
        assert (info["version"], info["latent_dim"]) == (version_b, 6)
        assert info["samplers"] == ["prior"] and info["sampler"] is None  # B has no sampler.pt
        r = requests.get(url + "/sample?sampler=gmm", timeout=30)
        assert r.status_code == 422 and r.json()["field"] == "sampler" and "fit_sampler" in r.json()["error"]
        assert versions[-1] == version_b
    finally:
        serve.delete("swap")


# --------------------------------------------------------------------------- config and CLI


def test_serve_yaml_is_valid_and_strict():
    from ray.serve.schema import ServeDeploySchema

    from ray_galaxy.serve.app import app_builder
    from ray_galaxy.serve.config import DECODER, ServeConfig
    from ray_galaxy.serve.yaml_check import check_serve_config

    data = yaml.safe_load(SERVE_YAML.read_text())
    ServeDeploySchema.model_validate(data)
    assert check_serve_config(data) == []
    app = data["applications"][0]
    assert app["import_path"] == "ray_galaxy.serve.app:app_builder"
    assert app["args"]["model"] == "runs/galaxy-vae/model" == ServeConfig().model
    assert set(app["args"]) == set(ServeConfig.__dataclass_fields__)  # every arg spelled out
    decoder = next(d for d in app["deployments"] if d["name"] == DECODER)
    assert decoder["max_ongoing_requests"] >= app["args"]["max_batch_size"]
    assert {"autoscaling_config", "ray_actor_options"} <= set(decoder)
    # New replicas start before old ones stop on a model swap (else requests wait seconds).
    assert all(d["max_surge_percent"] == 100 for d in app["deployments"])
    app_builder(app["args"])  # builds without touching the model

    def broken(edit) -> list[str]:
        d = yaml.safe_load(SERVE_YAML.read_text())
        edit(d)
        return check_serve_config(d)

    def typo(d):
        d["applications"][0]["deployments"][1]["autoscaling_config"]["max_replica"] = 4
    d = yaml.safe_load(SERVE_YAML.read_text())
    typo(d)
    ServeDeploySchema.model_validate(d)  # Ray's schema alone accepts the typo silently
    assert any("max_replica" in e for e in broken(typo))
    assert any("num_cpu" in e for e in broken(
        lambda d: d["applications"][0]["deployments"][0]["ray_actor_options"].update(num_cpu=1)))
    assert any("max_batch" in e for e in broken(lambda d: d["applications"][0]["args"].update(max_batch=4)))
    assert any("Decodr" in e for e in broken(
        lambda d: d["applications"][0]["deployments"][1].update(name="Decodr")))
    assert any("max_ongoing_requests" in e for e in broken(
        lambda d: d["applications"][0]["deployments"][1].update(max_ongoing_requests=4)))
    assert any("routeprefix" in e for e in broken(lambda d: d["applications"][0].update(routeprefix="/x")))
    assert any("htttp_options" in e for e in broken(lambda d: d.update(htttp_options={})))
    assert broken(lambda d: d.pop("applications"))  # Ray's own schema
    assert any("max_batch_size" in e for e in broken(
        lambda d: d["applications"][0]["args"].update(max_batch_size=0)))


def test_jobs_serve_refuses_bad_model_and_config(tmp_path):
    run = [sys.executable, str(REPO / "jobs" / "serve.py")]
    r = subprocess.run(run + ["--model", str(tmp_path / "missing")], capture_output=True, text=True,
                       env=job_env(), timeout=120)
    assert r.returncode == 2 and "not a finished model directory" in r.stderr
    bad = tmp_path / "serve.yaml"
    d = yaml.safe_load(SERVE_YAML.read_text())
    d["applications"][0]["deployments"][1]["autoscaling_config"]["max_replica"] = 4
    bad.write_text(yaml.safe_dump(d))
    r = subprocess.run(run + ["--model", str(tmp_path), "--config", str(bad)], capture_output=True, text=True,
                       env=job_env(), timeout=120)
    assert r.returncode == 2 and "max_replica" in r.stderr
    h = subprocess.run(run + ["--help"], capture_output=True, text=True, env=job_env(), timeout=120)
    assert h.returncode == 0 and "--model" in h.stdout and "127.0.0.1" in h.stdout


def test_jobs_serve_end_to_end(tmp_path, models):
    """`python jobs/serve.py --model DIR` as a user runs it: its own local Ray (no RAY_ADDRESS),
    a loopback port, the token from the environment; SIGTERM stops it cleanly."""
    import signal

    from conftest import free_port

    port = free_port()
    env = job_env({"RAY_GALAXY_TOKEN": TOKEN})
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "serve.py"), "--model", models.a,
                             "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not any("latent explorer: open" in line for line in lines):
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "jobs/serve.py did not come up:\n" + "".join(lines)[-3000:]
            time.sleep(0.5)
        assert any(f"{base}/?token=<$RAY_GALAXY_TOKEN>" in line for line in lines)  # never the token itself
        assert not any(TOKEN in line for line in lines)
        assert requests.get(base + "/healthz", timeout=30).json() == {"status": "ok"}
        assert requests.get(base + "/sample?seed=3", timeout=30).status_code == 401
        r = requests.get(base + "/sample?seed=3", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert r.status_code == 200 and r.content == expected_png(models, 3)
        page = requests.get(base + f"/?token={TOKEN}", timeout=30)  # follows the redirect with the cookie
        assert page.status_code == 200 and "latent explorer" in page.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        reader.join(timeout=10)
    assert code == 0 and any("shutting down" in line for line in lines), "".join(lines)[-3000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(base + "/healthz", timeout=5)


def test_model_name_activity_order_and_chunk_rows_config():
    import torch

    from ray_galaxy.checkpoint import ModelDir
    from ray_galaxy.config import ConfigError, ModelConfig
    from ray_galaxy.generation.generator import Generator
    from ray_galaxy.generation.sampler import MixtureSampler
    from ray_galaxy.serve.config import ServeConfig
    from ray_galaxy.serve.config import model_name

    assert model_name("s3://bucket/runs/galaxy-vae/model") == "galaxy-vae"
    assert model_name("/tmp/x/a/") == "a" and model_name("s3://bucket") == "bucket"
    # Two equal components at x=0 and x=2: variance along x is within (1) + between (1) = 2.
    sampler = MixtureSampler({"weights": torch.tensor([0.5, 0.5]),
                              "means": torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]),
                              "covariances": torch.diag_embed(torch.tensor([[1.0, 4.0, 0.1], [1.0, 4.0, 0.1]]))},
                             {"kind": "gmm"})
    np.testing.assert_allclose(sampler.variance(), [2.0, 4.0, 0.1], rtol=1e-6)

    def gen(metrics, s=None) -> Generator:  # /info's dims_by_activity, without a model on disk
        cfg = ModelConfig(image_size=SIZE, channels=(8, 16, 32, 32), latent_dim=3)
        return Generator(ModelDir("m", cfg, None, {}, metrics, "0" * 64), s, None if s else "none")

    assert gen({}, sampler).dims_by_activity() == [1, 0, 2]
    assert gen({"best": {"val_kl_per_dim": [0.1, 3.0, 2.0]}}).dims_by_activity() == [1, 2, 0]
    assert gen({"best": {"val_kl_per_dim": [0.1, float("nan"), 2.0]}}).dims_by_activity() == [0, 1, 2]
    with pytest.raises(ConfigError, match="decode_chunk_rows"):
        ServeConfig(model="m", decode_chunk_rows=-1)
