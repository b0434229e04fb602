"""Several models behind one endpoint (Serve's model multiplexing) over real HTTP.

The session's ``/multi`` application (conftest.py ``multi_server``) serves the two tiny models
A (latent 4, GMM sampler) and B (latent 6, prior only) with at most one model loaded per
decoder replica, so every change of model evicts the other. A request names its model with
``model=`` (query parameter or JSON field; default: the first). Images are compared byte for
byte with what jobs/sample.py writes for the same model directory and seed.
"""

from __future__ import annotations

import importlib.util
import io
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from conftest import REPO
from serving import expected_images

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")


def version_of(uri: str) -> str:
    from ray_galaxy.checkpoint import load_model_dir

    return load_model_dir(uri, weights=False).version


def png_of(gen, n: int, seed: int) -> list[bytes]:
    """GET /sample's bytes for galaxies 0..n-1 of ``seed`` (default sampler), in this process."""
    from ray_galaxy.images import png_bytes

    return [png_bytes(img) for img in gen.images(n, seed)]


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_models_listing_and_info_per_model(multi_server, server, models):
    url = multi_server["url"]
    listing = requests.get(url + "/models", timeout=30).json()
    assert listing["default"] == "a" and listing["max_num_models_per_replica"] == 1
    by_name = {m["name"]: m for m in listing["models"]}
    assert list(by_name) == ["a", "b"]
    assert (by_name["a"]["version"], by_name["b"]["version"]) == (version_of(models.a), version_of(models.b))
    assert by_name["a"]["samplers"] == ["prior", "gmm"] and by_name["b"]["samplers"] == ["prior"]
    assert (by_name["a"]["latent_dim"], by_name["b"]["latent_dim"]) == (4, 6)
    assert by_name["b"]["model"] == models.b
    info_b = requests.get(url + "/info", params={"model": "b"}, timeout=30).json()
    assert (info_b["name"], info_b["version"], info_b["latent_dim"]) == ("b", version_of(models.b), 6)
    assert info_b["serving"]["models"] == ["a", "b"] and info_b["sampler"] is None
    assert requests.get(url + "/info", timeout=30).json()["version"] == version_of(models.a)  # default: first
    # One model: the same listing, with that model only.
    single = requests.get(server.url + "/models", timeout=30).json()
    assert single["default"] == "a" and [m["name"] for m in single["models"]] == ["a"]
    assert single["decoder"]["loaded"] == ["a"]


def test_each_model_gives_the_bytes_of_jobs_sample(multi_server, models, tmp_path):
    """The same (model, seed): the PNGs jobs/sample.py writes for that model directory, for GET
    (?model=) and POST (JSON "model") /sample; other routes decode with the named model too."""
    import torch

    from ray_galaxy.generation.latents import traversal_latents
    from ray_galaxy.images import grid, png_bytes

    url, sample = multi_server["url"], load_job("sample")
    for name, uri in (("a", models.a), ("b", models.b)):
        out = tmp_path / name
        assert sample.main(["--model", uri, "--n", "3", "--seed", "4", "--out", str(out)]) == 0
        written = [(out / f"sample_{i:05d}.png").read_bytes() for i in range(3)]
        one = requests.get(url + "/sample", params={"seed": 4, "model": name}, timeout=60)
        assert one.status_code == 200 and one.headers["x-model-version"] == version_of(uri)
        assert one.content == written[0], name
        z = requests.post(url + "/sample", json={"n": 3, "seed": 4, "format": "zip", "model": name}, timeout=60)
        with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
            assert [zf.read(f"galaxy_{i:02d}.png") for i in range(3)] == written, name
    assert requests.get(url + "/sample?seed=4", timeout=60).content == png_of(multi_server["gens"]["a"], 1, 4)[0]

    gen_b = multi_server["gens"]["b"]
    code = [0.5, -1.0, 0.25, 2.0, -0.5, 1.5]  # B's length: A would answer 422
    r = requests.post(url + "/decode", json={"z": code, "model": "b"}, timeout=60)
    assert r.content == png_bytes(expected_images(gen_b.model, torch.tensor([code]))[0])
    r = requests.get(url + "/traverse", params={"model": "b", "dims": "4,5", "steps": 3}, timeout=60)
    z = traversal_latents(torch.zeros(6), (4, 5), 3, 3.0)
    assert r.status_code == 200 and r.content == png_bytes(grid(expected_images(gen_b.model, z), ncols=3))
    npy = requests.post(url + "/sample", json={"n": 5, "seed": 2, "format": "npy", "model": "b"}, timeout=60)
    np.testing.assert_array_equal(np.load(io.BytesIO(npy.content)), gen_b.images(5, 2))


def test_unknown_model_is_422_listing_the_valid_ones(multi_server):
    url = multi_server["url"]
    for method, path, kwargs in (("get", "/sample?model=c", {}), ("get", "/info?model=c", {}),
                                 ("post", "/sample", {"json": {"n": 2, "model": "c"}}),
                                 ("post", "/decode", {"json": {"z": [0.0] * 4, "model": "c"}}),
                                 ("post", "/interpolate?model=c", {"json": {"from": 1, "to": 2}})):
        r = requests.request(method, url + path, timeout=30, **kwargs)
        assert r.status_code == 422 and r.json()["field"] == "model", (path, r.text)
        assert "'c'" in r.json()["error"] and "valid models are: a, b" in r.json()["error"]
    clash = requests.post(url + "/sample?model=a", json={"n": 1, "model": "b"}, timeout=30)
    assert clash.status_code == 422 and clash.json()["field"] == "model"
    wrong_length = requests.post(url + "/decode", json={"z": [0.0] * 4, "model": "b"}, timeout=30)
    assert wrong_length.status_code == 422 and "6 values" in wrong_length.json()["error"]


def test_lru_eviction_keeps_a_bounded_set_and_answers_every_model(multi_server):
    """At most one model per replica and two models: each change of model evicts the other
    (least recently used), and requests for both, one after the other and all at once, still
    get each model's bytes."""
    url, gens = multi_server["url"], multi_server["gens"]

    def loaded() -> list[str]:
        return requests.get(url + "/models", timeout=30).json()["decoder"]["loaded"]

    for name in ("a", "b", "a"):
        r = requests.get(url + "/sample", params={"seed": 9, "model": name}, timeout=60)
        assert r.content == png_of(gens[name], 1, 9)[0]
        assert loaded() == [name]

    jobs = [("ab"[i % 2], 20 + i) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: requests.get(
            url + "/sample", params={"seed": job[1], "model": job[0]}, timeout=120), jobs))
    assert [r.status_code for r in answers] == [200] * len(jobs)
    assert [r.content for r in answers] == [png_of(gens[name], 1, seed)[0] for name, seed in jobs]
    assert len(loaded()) == 1


def test_model_names_and_lists_in_the_config(models, tmp_path, capsys):
    from ray_galaxy.config import ConfigError
    from ray_galaxy.serve.config import ServeConfig, model_name, named_models, serve_config
    from ray_galaxy.serve.runner import prepare

    assert model_name("s3://bucket/runs/galaxy-vae/model") == "galaxy-vae"
    assert named_models(("runs/gz2/model", "xdf=s3://b/runs/x/model", "runs/lr=0.1/model")) == [
        ("gz2", "runs/gz2/model"), ("xdf", "s3://b/runs/x/model"), ("lr=0.1", "runs/lr=0.1/model")]
    assert serve_config({"model": ["p/a", "q/b"]}).model == ("p/a", "q/b")  # a YAML list
    assert ServeConfig(model="m").multiplexed is False and ServeConfig(model=("m",)).multiplexed is False
    with pytest.raises(ConfigError, match=r"'x/run1/model' and 'y/run1/model' would both be served as 'run1'.*"
                                          r"NAME=PATH, e\.g\. run1-2=y/run1/model"):
        ServeConfig(model=("x/run1/model", "y/run1/model"))
    with pytest.raises(ConfigError, match="max_num_models_per_replica"):
        ServeConfig(max_num_models_per_replica=0)
    with pytest.raises(ConfigError, match="model"):
        ServeConfig(model=())

    serve_yaml = str(REPO / "cluster" / "serve.yaml")
    args, _, _ = prepare([models.a, "other=" + models.b], serve_yaml)
    assert args["model"] == (models.a, "other=" + models.b)
    assert serve_config(args).models == [("a", models.a), ("other", models.b)]
    assert prepare([models.a], serve_yaml)[0]["model"] == models.a  # one model: a plain string, as before
    job = load_job("serve")
    assert job.main(["--model", models.a, "--model", str(tmp_path / "a")]) == 2
    assert "both be served as 'a'" in capsys.readouterr().err


def test_redeploying_with_a_longer_model_list_drops_no_request(multi_server, server, models, tmp_path_factory):
    """A model swap of a multiplexed endpoint: redeployed with a third model (``c``, another tiny
    one) while clients keep asking for every model. Requests for A and B never fail and keep
    their versions; requests for C are 422 (unknown) while old ingress replicas answer, and once
    the rollout is done always served by C. Runs last: the session's ``/multi`` keeps the three."""
    import threading
    import time

    from ray import serve
    from serving import SMALL, train_tiny

    from ray_galaxy.serve.app import build_app

    url, c = multi_server["url"], train_tiny(str(tmp_path_factory.mktemp("multi-swap") / "c"), 2)
    versions = {"a": version_of(models.a), "b": version_of(models.b), "c": version_of(c)}
    assert len(set(versions.values())) == 3
    answers: dict[str, list] = {name: [] for name in versions}  # (time, status, version)
    stop = threading.Event()

    def hammer(name: str) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = requests.get(url + "/sample", params={"seed": i, "model": name}, timeout=60)
                answers[name].append((time.monotonic(), r.status_code, r.headers.get("x-model-version")))
            except requests.RequestException as e:  # a dropped connection is a failure too
                answers[name].append((time.monotonic(), repr(e), None))

    threads = [threading.Thread(target=hammer, args=(name,), daemon=True) for name in versions]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        redeploy = time.monotonic()
        args = {**server.args, "model": [models.a, models.b, c], "max_num_models_per_replica": 1}
        serve.run(build_app(args, SMALL, token=None), name="multi", route_prefix="/multi")
        settled = time.monotonic() + 2.0  # the proxies learn that the old ingress replica stopped
        while sum(1 for t, *_ in answers["c"] if t > settled) < 5 and time.monotonic() < settled + 60:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    for name in ("a", "b"):
        assert [a for a in answers[name] if a[1:] != (200, versions[name])] == [], name
        assert sum(1 for t, *_ in answers[name] if t < redeploy) and sum(1 for t, *_ in answers[name] if t > settled)
    assert all(a[1] == 422 for a in answers["c"] if a[1:] != (200, versions["c"]))
    after = [a for a in answers["c"] if a[0] > settled]
    assert len(after) >= 5 and all(a[1:] == (200, versions["c"]) for a in after)
    listing = requests.get(url + "/models", timeout=30).json()
    assert [m["name"] for m in listing["models"]] == ["a", "b", "c"] and len(listing["decoder"]["loaded"]) == 1
