"""``fused: true``: the decoder inside the ingress replicas, one deployment instead of two
(docs/serve.md). Over real HTTP it answers every route with the bytes of the two-deployment app,
under concurrent requests too (its dynamic batching is the Decoder's own)."""

import io
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serving import galaxy_png

from ray_galaxy.config import ConfigError
from ray_galaxy.serve.app import build_app

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

FUSED = {"GalaxyAPI": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25},
                       "logging_config": {"enable_access_log": False}}}


@pytest.fixture(scope="module")
def fused(server):
    from ray import serve

    serve.run(build_app({**server.args, "fused": True}, FUSED, token=None), name="fused", route_prefix="/fused")
    try:
        yield server.base + "/fused"
    finally:
        serve.delete("fused")


def _zip(content: bytes) -> list[bytes]:
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        return [zf.read(name) for name in sorted(zf.namelist())]


def test_one_deployment_answers_with_the_bytes_of_two(fused, server):
    from ray import serve

    assert list(serve.status().applications["fused"].deployments) == ["GalaxyAPI"]
    png = galaxy_png(size=32)
    calls = [("GET", "/sample", {"params": {"seed": 5}}),
             ("GET", "/sample", {"params": {"seed": 6, "sampler": "prior", "temperature": 0.7}}),
             ("POST", "/decode", {"json": {"z": [0.1, -0.4, 1.2, 0.3]}}),
             ("POST", "/interpolate", {"json": {"from": 1, "to": 2, "steps": 5}}),
             ("GET", "/traverse", {"params": {"steps": 3}}),
             ("POST", "/reconstruct", {"data": png, "headers": {"content-type": "image/png"}})]
    for method, path, kwargs in calls:
        got = requests.request(method, fused + path, timeout=60, **kwargs)
        want = requests.request(method, server.url + path, timeout=60, **kwargs)
        assert got.status_code == want.status_code == 200, (path, got.text[:200])
        assert got.content == want.content, path
    body = {"n": 20, "seed": 3, "format": "zip"}  # more rows than max_batch_size: sent in chunks
    assert _zip(requests.post(fused + "/sample", json=body, timeout=60).content) == \
        _zip(requests.post(server.url + "/sample", json=body, timeout=60).content)
    bad = requests.get(fused + "/sample", params={"seed": -1}, timeout=30)
    assert bad.status_code == 422 and bad.json()["field"] == "seed"
    info = requests.get(fused + "/info", timeout=30).json()
    assert info["version"] == requests.get(server.url + "/info", timeout=30).json()["version"]
    models = requests.get(fused + "/models", timeout=30).json()
    assert models["decoder"]["loaded"] == [models["default"]]


def test_concurrent_requests_share_batches_and_get_their_own_bytes(fused, server):
    seeds = list(range(40, 72))
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda s: requests.get(fused + "/sample", params={"seed": s}, timeout=60), seeds))
    assert all(r.status_code == 200 for r in got)
    assert [r.content for r in got] == [requests.get(server.url + "/sample", params={"seed": s}, timeout=60).content
                                        for s in seeds]


def test_fused_settings_that_cannot_work_are_clear_errors(models):
    with pytest.raises(ConfigError, match="fused: true serves one model"):
        build_app({"model": [models.a, models.b], "fused": True}, token=None)
    with pytest.raises(ConfigError, match="give its options .* under GalaxyAPI, not Decoder"):
        build_app({"model": models.a, "fused": True}, {"Decoder": {"num_replicas": 2}}, token=None)
    with pytest.raises(ConfigError, match="GalaxyAPI.max_ongoing_requests .2. must be >= max_batch_size"):
        build_app({"model": models.a, "fused": True, "max_batch_size": 8},
                  {"GalaxyAPI": {"max_ongoing_requests": 2}}, token=None)


def test_cluster_serve_fused_yaml_is_valid_and_strict():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from conftest import REPO
    from ray_galaxy.serve.config import ServeConfig
    from ray_galaxy.serve.yaml_check import check_serve_config

    data = yaml.safe_load((REPO / "cluster" / "serve-fused.yaml").read_text())
    ServeDeploySchema.model_validate(data)
    assert check_serve_config(data) == []
    (app,) = data["applications"]
    assert app["args"]["fused"] is True and set(app["args"]) == set(ServeConfig.__dataclass_fields__)
    assert [d["name"] for d in app["deployments"]] == ["GalaxyAPI"]
    # cluster/serve.yaml with fused turned on but its Decoder entry left in: named, not ignored.
    two = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    two["applications"][0]["args"]["fused"] = True
    assert any("under GalaxyAPI, not Decoder" in e for e in check_serve_config(two))
