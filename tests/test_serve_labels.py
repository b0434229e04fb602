"""Serving galaxies of one class (``label=``) over real HTTP.

A copy of model A with a sampler fitted on two classes is deployed beside the session's Serve
apps (``/labelled``: the ``labelled_server`` fixture in conftest.py, shared with the explorer
tests); the session's model A, whose sampler has no labels, answers the "trained without labels"
case. Every image is compared byte for byte with the Generator in this process.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import requests
from serving import CLASSES, pixels, tile

from ray_galaxy.images import grid, png_bytes


def _error(r: requests.Response) -> str:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == "label", body
    return body["error"]


def test_info_lists_the_labels(labelled_server, server):
    info = requests.get(labelled_server["url"] + "/info", timeout=30).json()
    assert info["labels"] == CLASSES and info["sampler"]["labels"] == CLASSES
    assert requests.get(server.url + "/info", timeout=30).json()["labels"] == []  # fitted without labels


def test_sample_by_label_equals_the_generator(labelled_server):
    url, gen = labelled_server["url"], labelled_server["gen"]
    spiral = requests.get(url + "/sample", params={"seed": 7, "label": "spiral"}, timeout=30)
    assert spiral.status_code == 200 and spiral.headers["content-type"] == "image/png"
    assert spiral.content == png_bytes(gen.images(1, 7, label="spiral")[0])
    other = requests.get(url + "/sample?seed=7&label=non_spiral", timeout=30).content
    assert other == png_bytes(gen.images(1, 7, label="non_spiral")[0]) != spiral.content
    assert requests.get(url + "/sample?seed=7", timeout=30).content == png_bytes(gen.images(1, 7)[0])

    body = {"n": 5, "seed": 3, "temperature": 0.8, "label": "non_spiral"}
    want = gen.images(5, 3, temperature=0.8, label="non_spiral")
    npy = requests.post(url + "/sample", json={**body, "format": "npy"}, timeout=30)
    np.testing.assert_array_equal(np.load(io.BytesIO(npy.content), allow_pickle=False), want)
    assert requests.post(url + "/sample", json=body, timeout=30).content == png_bytes(grid(want))
    z = requests.post(url + "/sample", json={**body, "format": "zip", "detail": False}, timeout=30)
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        means = gen.images(5, 3, temperature=0.8, detail=False, label="non_spiral")
        assert [zf.read(n) for n in sorted(zf.namelist())] == [png_bytes(im) for im in means]


def test_latent_and_interpolate_by_label(labelled_server):
    url, gen = labelled_server["url"], labelled_server["gen"]
    body = requests.get(url + "/latent", params={"seed": 4, "label": "spiral"}, timeout=30).json()
    assert body["label"] == "spiral" and body["sampler"] == "gmm"
    np.testing.assert_array_equal(np.float32(body["z"]), gen.latents(1, 4, label="spiral")[0].numpy())
    r = requests.post(url + "/interpolate", json={"from": 4, "to": 9, "steps": 3, "label": "spiral"}, timeout=30)
    assert r.status_code == 200, r.text
    strip = pixels(r.content)
    assert np.array_equal(tile(strip, 0), gen.images(1, 4, detail=False, label="spiral")[0])  # codes: means
    assert np.array_equal(tile(strip, 2), gen.images(1, 9, detail=False, label="spiral")[0])


@pytest.mark.parametrize("method,path,kwargs", [
    ("get", "/sample?label=barred", {}),
    ("post", "/sample", {"json": {"n": 2, "label": "barred"}}),
    ("get", "/latent?seed=1&label=barred", {}),
    ("post", "/interpolate", {"json": {"from": 1, "to": 2, "label": "barred"}}),
], ids=["get-sample", "post-sample", "latent", "interpolate"])
def test_unknown_label_is_422_listing_the_valid_ones(labelled_server, method, path, kwargs):
    error = _error(requests.request(method, labelled_server["url"] + path, timeout=30, **kwargs))
    assert "'barred'" in error and "valid labels are: non_spiral, spiral" in error


def test_label_needs_the_sampler_and_a_name(labelled_server):
    url = labelled_server["url"]
    assert "needs the fitted sampler" in _error(requests.get(url + "/sample?label=spiral&sampler=prior", timeout=30))
    _error(requests.get(url + "/sample?label=", timeout=30))  # empty: not "any class"
    _error(requests.post(url + "/sample", json={"label": "x" * 201}, timeout=30))
    _error(requests.post(url + "/sample", json={"label": 3}, timeout=30))


def test_model_without_labels_says_so(server):
    for r in (requests.get(server.url + "/sample?seed=1&label=spiral", timeout=30),
              requests.post(server.url + "/sample", json={"n": 2, "label": "spiral"}, timeout=30),
              requests.get(server.url + "/latent?label=spiral", timeout=30)):
        error = _error(r)
        assert "was trained without labels" in error and "--labels" in error


def test_explorer_offers_the_classes(server):
    """Static check of the explorer (the browser tests need Chromium): a class selector filled
    from /info's labels that adds ``label`` to the seed requests."""
    page = requests.get(server.url + "/", timeout=30).text
    script = requests.get(server.url + "/explorer/app.js", timeout=30).text
    assert 'id="label"' in page and 'id="label-note"' in page
    assert "info.labels" in script and "label: select.value" in script and "trained without labels" in script
