"""Offline checks of the cluster configs: the Ray launcher YAML and the KubeRay manifests.

* ``cluster/aws-gpu.yaml`` against the JSON schema that ships inside the installed ray package
  (the one ``ray up`` validates with).
* ``cluster/kuberay/*.yaml`` against the ``openAPIV3Schema`` (version v1) of KubeRay's CRDs in
  ``../shared/schemas/kuberay/``. KubeRay prunes unknown fields instead of rejecting them, so
  the schema is made strict first: every object schema that lists ``properties`` gets
  ``additionalProperties: false``, and a misspelt key fails here rather than being dropped.
  CEL rules (``x-kubernetes-validations``) are not evaluated.

No network, no Ray cluster; runs in about a second.
"""

from __future__ import annotations

import copy
import json
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
AWS_CONFIG = CLUSTER / "aws-gpu.yaml"
KUBERAY = CLUSTER / "kuberay"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB = KUBERAY / "rayjob-train.yaml"
CRD_DIR = REPO.parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
IMAGE = "rayproject/ray:2.60.0-py311-gpu"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-1.4 MB of YAML


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.load(f, Loader=_Loader)


def error_messages(validator: Any, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(instance)]


# --------------------------------------------------------------------------- Ray launcher


@lru_cache(maxsize=None)
def ray_launcher_validator() -> Any:
    import ray

    schema_path = Path(ray.__file__).resolve().parent / "autoscaler" / "ray-schema.json"
    assert schema_path.is_file(), f"ray package has no launcher schema at {schema_path}"
    schema = json.loads(schema_path.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def aws_config() -> dict[str, Any]:
    return load_yaml(AWS_CONFIG)


def test_aws_config_matches_ray_launcher_schema(aws_config):
    assert error_messages(ray_launcher_validator(), aws_config) == []


def test_aws_config_passes_ray_up_validation(aws_config):
    """What ``ray up`` does before touching AWS: fill in the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws_config)))


def test_aws_config_layout(aws_config):
    assert aws_config["cluster_name"] == "ray-galaxy"
    assert aws_config["provider"]["type"] == "aws"
    assert aws_config["provider"]["region"] == "us-west-2"
    assert aws_config["docker"]["image"] == IMAGE
    assert aws_config["docker"]["container_name"]

    types = aws_config["available_node_types"]
    head_name = aws_config["head_node_type"]
    head = types[head_name]
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    assert head["resources"] == {"CPU": 0}

    workers = {k: v for k, v in types.items() if k != head_name}
    assert len(workers) == 1
    (gpu,) = workers.values()
    assert gpu["node_config"]["InstanceType"] == "g5.xlarge"
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 4)
    assert gpu["max_workers"] <= aws_config["max_workers"]

    # S3 through instance profiles only.
    for node_type in types.values():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    text = AWS_CONFIG.read_text()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AWS_ACCESS_KEY_ID",
                   "AWS_SECRET_ACCESS_KEY", "AKIA"):
        assert secret not in text

    # The repo is synced to ~/ray-galaxy and its requirements installed from there.
    assert aws_config["file_mounts"] == {"~/ray-galaxy": "."}
    assert any("~/ray-galaxy" in c and "pip install -r requirements.txt" in c
               for c in aws_config["setup_commands"])


def test_aws_config_has_gpus_for_train_gpu_yaml(aws_config):
    from ray_galaxy.config import train_config

    cfg = train_config(CLUSTER / "train-gpu.yaml")
    head = aws_config["head_node_type"]
    gpus = sum(t.get("max_workers", 0) * t["resources"].get("GPU", 0)
               for k, t in aws_config["available_node_types"].items() if k != head)
    assert cfg.use_gpu and gpus >= cfg.max_workers


@pytest.mark.parametrize("where", ["node_type", "docker", "top_level"])
def test_aws_config_typo_fails(aws_config, where):
    bad = copy.deepcopy(aws_config)
    if where == "node_type":
        gpu = next(t for k, t in bad["available_node_types"].items() if k != bad["head_node_type"])
        gpu["max_worker"] = gpu.pop("max_workers")
    elif where == "docker":
        bad["docker"]["container_nme"] = bad["docker"].pop("container_name")
    else:
        bad["setup_command"] = bad.pop("setup_commands")
    errors = error_messages(ray_launcher_validator(), bad)
    assert errors and any("not allowed" in e for e in errors), errors


# --------------------------------------------------------------------------- KubeRay


def _strict(node: Any) -> None:
    """Make a CRD structural schema usable by jsonschema and strict about unknown keys (in place)."""
    if isinstance(node, list):
        for item in node:
            _strict(item)
        return
    if not isinstance(node, dict):
        return
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") is True and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]  # OpenAPI's nullable in JSON Schema terms
    for key, value in node.items():
        if key == "properties":  # a mapping of field names, each a schema
            for sub in value.values():
                _strict(sub)
        elif key not in ("enum", "default", "example", "required"):
            _strict(value)


@lru_cache(maxsize=None)
def crd_schema(kind: str) -> str:
    """The v1 ``openAPIV3Schema`` of ``kind``, as JSON text (callers get fresh copies)."""
    path = CRD_DIR / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schemas not available ({path} missing)")
    crd = load_yaml(path)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return json.dumps(version["schema"]["openAPIV3Schema"])


@lru_cache(maxsize=None)
def kuberay_validator(kind: str, strict: bool = True) -> Any:
    schema = json.loads(crd_schema(kind))
    if strict:
        _strict(schema)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return load_yaml(RAYCLUSTER)


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return load_yaml(RAYJOB)


def test_strict_walk_only_closes_listed_objects():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "free": {"type": "object"},
        "kept": {"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
        "bare": {"x-kubernetes-int-or-string": True},
        "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
    }}
    _strict(schema)
    p = schema["properties"]
    assert schema["additionalProperties"] is False
    assert p["a"]["additionalProperties"] is False
    assert p["properties"]["additionalProperties"] is False  # a field called "properties"
    assert "additionalProperties" not in p["free"]
    assert "additionalProperties" not in p["kept"]
    assert p["map"]["additionalProperties"] == {"type": "string"}
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"q": 1, "bare": "1Gi", "free": {"anything": 1}, "kept": {"x": 1}})
    assert not v.is_valid({"bare": 1.5})
    assert not v.is_valid({"a": {"c": "typo"}})


@pytest.mark.parametrize("path,kind", [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")])
def test_kuberay_manifest_matches_crd_schema(path, kind):
    manifest = load_yaml(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == kind
    assert error_messages(kuberay_validator(kind), manifest) == []


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_cluster_shape(path):
    spec = _cluster_spec(load_yaml(path))
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (worker,) = spec["workerGroupSpecs"]
    assert (worker["minReplicas"], worker["maxReplicas"]) == (0, 4)
    pods = [head["template"]["spec"], worker["template"]["spec"]]
    for pod in pods:
        assert pod["serviceAccountName"]  # IRSA
        for c in pod["containers"]:
            assert c["image"] == IMAGE
            assert not any(e["name"].startswith("AWS_") for e in c.get("env", []))
    (gpu_container,) = worker["template"]["spec"]["containers"]
    assert int(gpu_container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert "AWS_SECRET_ACCESS_KEY" not in path.read_text()


def test_rayjob_settings(rayjob):
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "python jobs/train.py --config cluster/train-gpu.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert str(runtime_env["working_dir"]).endswith(".zip")


def test_rayjob_pip_matches_requirements(rayjob):
    """The runtime env installs requirements.txt's pins, except ray (the image provides it)."""
    reqs = {line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()}
    reqs = {r for r in reqs if r and not r.startswith("ray[") and not r.startswith("ray=")}
    pip = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["pip"]
    assert set(pip) == reqs


def test_rayjob_entrypoint_config_loads(rayjob):
    from ray_galaxy.config import train_config

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "python" and (REPO / argv[1]).is_file()
    config = REPO / argv[argv.index("--config") + 1]
    assert config.is_file(), f"entrypoint config {config} not in the repo"
    cfg = train_config(config)
    assert cfg.use_gpu is True


def _set_worker_typo(m: dict[str, Any]) -> None:
    worker = _cluster_spec(m)["workerGroupSpecs"][0]
    worker["maxReplica"] = worker.pop("maxReplicas")


def _add_head_typo(m: dict[str, Any]) -> None:  # optional field: caught only by the strict schema
    head = _cluster_spec(m)["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")


def _add_container_typo(m: dict[str, Any]) -> None:  # deep inside the embedded PodSpec
    container = _cluster_spec(m)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")


def _add_rayjob_typo(m: dict[str, Any]) -> None:
    m["spec"]["shutdownAfterJobFinish"] = m["spec"].pop("shutdownAfterJobFinishes")


TYPOS = {
    "RayCluster": [_set_worker_typo, _add_head_typo, _add_container_typo],
    "RayJob": [_set_worker_typo, _add_head_typo, _add_container_typo, _add_rayjob_typo],
}


@pytest.mark.parametrize("kind,typo", [(k, t) for k, ts in TYPOS.items() for t in ts],
                         ids=lambda x: x if isinstance(x, str) else x.__name__.strip("_"))
def test_kuberay_typo_fails(kind, typo, raycluster, rayjob):
    bad = copy.deepcopy(raycluster if kind == "RayCluster" else rayjob)
    typo(bad)
    errors = error_messages(kuberay_validator(kind), bad)
    assert any("Additional properties are not allowed" in e for e in errors), errors


def test_kuberay_unmodified_schema_misses_optional_typos(raycluster):
    """Why the schema is made strict: as shipped, the CRD lets a misspelt optional key through."""
    bad = copy.deepcopy(raycluster)
    _add_head_typo(bad)
    assert kuberay_validator("RayCluster", strict=False).is_valid(bad)
    assert not kuberay_validator("RayCluster", strict=True).is_valid(bad)


# --------------------------------------------------------------------------- RayJob (tune), RayService

RAYJOB_TUNE = KUBERAY / "rayjob-tune.yaml"
RAYSERVICE = KUBERAY / "rayservice.yaml"
SERVE_CONFIG = CLUSTER / "serve.yaml"
CRD_FILES["RayService"] = "ray.io_rayservices.yaml"


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return load_yaml(RAYSERVICE)


def _embedded_serve_config(manifest: dict[str, Any]) -> dict[str, Any]:
    text = manifest["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string"
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("path,kind", [(RAYJOB_TUNE, "RayJob"), (RAYSERVICE, "RayService")],
                         ids=["rayjob-tune", "rayservice"])
def test_new_kuberay_manifest_matches_crd_schema(path, kind):
    manifest = load_yaml(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == kind
    assert error_messages(kuberay_validator(kind), manifest) == []


@pytest.mark.parametrize("path", [RAYJOB_TUNE, RAYSERVICE], ids=["rayjob-tune", "rayservice"])
def test_new_kuberay_cluster_shape(path):
    manifest = load_yaml(path)
    spec = (manifest["spec"]["rayClusterConfig"] if manifest["kind"] == "RayService"
            else manifest["spec"]["rayClusterSpec"])
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (worker,) = spec["workerGroupSpecs"]
    assert (worker["minReplicas"], worker["maxReplicas"]) == (0, 4)
    for pod in (head["template"]["spec"], worker["template"]["spec"]):
        assert pod["serviceAccountName"] == "ray-galaxy"  # IRSA
        for c in pod["containers"]:
            assert c["image"] == IMAGE
            assert not any(e["name"].startswith("AWS_") for e in c.get("env", []))
    text = path.read_text()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AWS_ACCESS_KEY_ID",
                   "AWS_SECRET_ACCESS_KEY", "AKIA"):
        assert secret not in text


def test_rayjob_tune_settings(rayjob):
    tune_job = load_yaml(RAYJOB_TUNE)
    spec = tune_job["spec"]
    assert spec["entrypoint"] == "python jobs/tune.py --config cluster/tune-gpu.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    # Same code zip and pins as the training job, and the same cluster.
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert spec["rayClusterSpec"] == rayjob["spec"]["rayClusterSpec"]


def test_rayjob_tune_entrypoint_config_loads():
    """The entrypoint's arguments parse the way jobs/tune.py parses them, and the sweep's base
    training config (train_config: in the YAML) resolves too."""
    from ray_galaxy.config import parse_config
    from ray_galaxy.tuning.config import TuneConfig, base_train_config

    argv = shlex.split(load_yaml(RAYJOB_TUNE)["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1] == "jobs/tune.py" and (REPO / argv[1]).is_file()
    config = REPO / argv[argv.index("--config") + 1]
    assert config.is_file(), f"entrypoint config {config} not in the repo"
    cfg, _ = parse_config(TuneConfig, ["--config", str(config)] + argv[4:], "t")
    assert cfg.use_gpu is True
    base = base_train_config(cfg)
    assert base.use_gpu is True and base.num_workers == cfg.num_workers


def test_rayservice_serve_config_passes_strict_check(rayservice):
    from ray_galaxy.serve.yaml_check import check_serve_config

    assert check_serve_config(_embedded_serve_config(rayservice)) == []


def _app_structure(app: dict[str, Any]) -> dict[str, Any]:
    """An application without what may differ on Kubernetes: the model URI and the runtime env."""
    app = copy.deepcopy(app)
    app.pop("runtime_env", None)
    app["args"].pop("model")
    return app


def test_rayservice_serve_config_matches_serve_yaml(rayservice):
    embedded = _embedded_serve_config(rayservice)
    reference = load_yaml(SERVE_CONFIG)
    assert embedded["proxy_location"] == reference["proxy_location"]
    assert embedded["http_options"]["port"] == reference["http_options"]["port"]
    assert set(embedded) == set(reference)
    assert ([a["name"] for a in embedded["applications"]]
            == [a["name"] for a in reference["applications"]])
    for got, want in zip(embedded["applications"], reference["applications"]):
        assert set(got["args"]) == set(want["args"])
        assert [d["name"] for d in got["deployments"]] == [d["name"] for d in want["deployments"]]
        assert _app_structure(got) == _app_structure(want)
    (app,) = embedded["applications"]
    assert app["args"]["model"].startswith("s3://")
    runtime_env = app["runtime_env"]
    assert str(runtime_env["working_dir"]).endswith(".zip")


@pytest.mark.parametrize("where", ["autoscaling", "deployment", "args", "application"])
def test_rayservice_serve_config_typo_fails(rayservice, where):
    from ray_galaxy.serve.yaml_check import check_serve_config

    data = _embedded_serve_config(rayservice)
    app = data["applications"][0]
    if where == "autoscaling":
        auto = app["deployments"][1]["autoscaling_config"]
        auto["max_replica"] = auto.pop("max_replicas")
    elif where == "deployment":
        d = app["deployments"][0]
        d["max_ongoing_request"] = d.pop("max_ongoing_requests")
    elif where == "args":
        app["args"]["max_batch"] = app["args"].pop("max_batch_size")
    else:
        app["route_prefx"] = app.pop("route_prefix")
    # Round-trip through the manifest's string, as KubeRay would receive it.
    bad = copy.deepcopy(rayservice)
    bad["spec"]["serveConfigV2"] = yaml.safe_dump(data, sort_keys=False)
    assert error_messages(kuberay_validator("RayService"), bad) == []  # the CRD sees only a string
    errors = check_serve_config(_embedded_serve_config(bad))
    assert errors, f"typo at {where} not caught"


def test_rayservice_typo_fails(rayservice):
    bad = copy.deepcopy(rayservice)
    bad["spec"]["serveConfigV3"] = bad["spec"].pop("serveConfigV2")
    errors = error_messages(kuberay_validator("RayService"), bad)
    assert any("Additional properties are not allowed" in e for e in errors), errors
    bad = copy.deepcopy(rayservice)
    worker = bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    worker["maxReplica"] = worker.pop("maxReplicas")
    errors = error_messages(kuberay_validator("RayService"), bad)
    assert any("Additional properties are not allowed" in e for e in errors), errors
