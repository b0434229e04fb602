"""Shared fixtures: one local Ray cluster for the whole session, tiny image folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
GZ2 = SHARED / "datasets" / "gz2"

sys.path.insert(0, str(Path(__file__).resolve().parent))


# Ports for the servers the tests start come from a range that nothing else on the host takes:
# below the kernel's ephemeral range (32768-60999 on Linux: Ray's workers and every outgoing
# connection take theirs there, so a port found free by binding port 0 could be taken before the
# server binds it) and above Ray's worker ports (10002-19999 by default).
_PORT_LOW, _PORT_HIGH = 20000, 32000
_handed: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now and that no other test of this run is given.

    Starts at a random place in the range so that two suites on one host rarely try the same
    port; a port in use (by anything) is skipped.
    """
    import random
    import socket

    span = _PORT_HIGH - _PORT_LOW
    start = random.randrange(span)
    for i in range(span):
        port = _PORT_LOW + (start + i) % span
        if port in _handed:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORT_LOW}-{_PORT_HIGH}")


class S3Server:
    """moto's standalone S3 server on a loopback port; can be stopped and started again
    (its buckets live in this process, so they survive a restart)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """A real S3-protocol server (moto's standalone server) on a free loopback port.

    Started before Ray so that every Ray worker inherits the standard AWS environment
    (AWS_ENDPOINT_URL and test credentials), exactly as a deployment would provide it.
    """
    server = S3Server()
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1"})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server) -> str:
    return s3_server.endpoint


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory, s3_endpoint) -> str:
    """One real local Ray cluster shared by every test; job subprocesses join it via RAY_ADDRESS.

    Four logical CPUs on this 2-core machine so Train workers and Ray Data never starve each
    other (see docs/data.md, "Resources on small machines"). Workers get this cluster's address in
    RAY_ADDRESS (``ray_runtime_env``, as ``ensure_ray`` does for jobs), so Ray Train's cleanup
    finds it when other Ray instances run on this host.
    """
    import ray

    from ray_galaxy.runtime import ray_runtime_env

    os.environ.setdefault("RAY_GALAXY_CACHE", str(tmp_path_factory.mktemp("cache")))
    # Ray Train's controller polls its workers every 2 s by default, and a run's end waits for
    # polls (about 3 s of every tiny run here); set before ray.init, so the raylet, every worker
    # it starts and every job subprocess (job_env) inherit it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ctx = ray.init(num_cpus=4, include_dashboard=True, logging_level="warning",
                   runtime_env=ray_runtime_env(str(REPO)))
    address = ctx.address_info["gcs_address"]
    os.environ["RAY_ADDRESS"] = address
    yield address
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """40 synthetic 48px galaxies in nested folders."""
    from synthetic import write_folder

    root = tmp_path_factory.mktemp("tiny")
    write_folder(root, 40, size=48)
    return root


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Two tiny trained model directories (serving.train_tiny): ``a`` (latent 4, with a GMM
    sampler) and ``b`` (latent 6), plus ``model_a`` loaded here for byte-exact comparisons."""
    from types import SimpleNamespace

    import numpy as np
    from serving import SIZE, train_tiny
    from synthetic import galaxy

    from ray_galaxy.checkpoint import load_model_dir
    from ray_galaxy.generation.fit import fit_sampler

    root = tmp_path_factory.mktemp("serve-models")
    # B also has another latent size: the swap must not mix an old and a new replica's codes.
    a, b = train_tiny(str(root / "a"), 0), train_tiny(str(root / "b"), 1, latent_dim=6)
    # A also carries a two-stage GMM sampler (served as sampler=gmm); B has none.
    rng = np.random.default_rng(3)
    fit_sampler(a, images=np.stack([galaxy(SIZE, rng) for _ in range(48)]), components=2)
    return SimpleNamespace(a=a, b=b, model_a=load_model_dir(a).model)


@pytest.fixture(scope="session")
def server(ray_address, models):
    """Ray Serve on a loopback port, shared by every Serve test: model A as ``/galaxy`` (no
    token) and ``/auth`` (bearer token ``serving.TOKEN``)."""
    from types import SimpleNamespace

    from ray import serve
    from serving import BODY_LIMIT, MAX_BATCH, SMALL, TOKEN

    from ray_galaxy.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": models.a, "max_batch_size": MAX_BATCH, "batch_wait_timeout_s": 0.05,
            "max_body_bytes": BODY_LIMIT}
    serve.run_many([
        serve.RunTarget(build_app(args, SMALL, token=None), name="galaxy", route_prefix="/galaxy"),
        serve.RunTarget(build_app(args, SMALL, token=TOKEN), name="galaxy-auth", route_prefix="/auth"),
    ])
    base = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(base=base, url=base + "/galaxy", auth=base + "/auth", args=args)
    serve.shutdown()


@pytest.fixture(scope="session")
def labelled_server(server, models, tmp_path_factory) -> dict:
    """Model A copied, its sampler refitted on 48 galaxies of two classes (``serving.CLASSES``),
    served as ``/labelled`` beside the session's apps; shared by the Serve and explorer tests.
    Gives its ``url`` and its ``gen`` (a Generator of the copy, for byte-exact comparisons)."""
    import shutil

    import numpy as np
    from ray import serve
    from serving import CLASSES, SIZE, SMALL
    from synthetic import galaxy

    from ray_galaxy.generation.fit import fit_sampler
    from ray_galaxy.generation.generator import Generator
    from ray_galaxy.serve.app import build_app

    uri = str(tmp_path_factory.mktemp("labelled") / "model")
    shutil.copytree(models.a, uri)
    rng = np.random.default_rng(5)
    fit_sampler(uri, images=np.stack([galaxy(SIZE, rng) for _ in range(48)]),
                image_labels=[CLASSES[i % 2] for i in range(48)], components=2)
    serve.run(build_app({**server.args, "model": uri}, SMALL, token=None), name="labelled",
              route_prefix="/labelled")
    try:
        yield {"url": server.base + "/labelled", "gen": Generator.load(uri)}
    finally:
        serve.delete("labelled")


@pytest.fixture(scope="session")
def multi_server(server, models) -> dict:
    """Models A and B behind one application (``/multi``; Serve's model multiplexing, at most
    one model loaded per decoder replica, so every change of model evicts the other), beside the
    session's apps; shared by the Serve and explorer tests (the last test of test_serve_multi.py
    redeploys it with a third model). Gives its ``url`` and a Generator per model name (``gens``)
    for byte-exact comparisons."""
    from ray import serve
    from serving import SMALL

    from ray_galaxy.generation.generator import Generator
    from ray_galaxy.serve.app import build_app

    args = {**server.args, "model": [models.a, models.b], "max_num_models_per_replica": 1}
    serve.run(build_app(args, SMALL, token=None), name="multi", route_prefix="/multi")
    try:
        yield {"url": server.base + "/multi", "gens": {"a": Generator.load(models.a), "b": Generator.load(models.b)}}
    finally:
        serve.delete("multi")


def job_env(extra: dict | None = None) -> dict:
    """Environment for a job subprocess: joins the shared cluster, imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env
