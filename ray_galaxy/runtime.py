"""Connecting a job to Ray: a local Ray of its own, or the cluster in ``RAY_ADDRESS``.

Every job that uses Ray (training, Tune, data preparation) calls :func:`ensure_ray` first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ray
from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

from ray_galaxy.console import log
from ray_galaxy.storage import absolute


def export_cluster_address() -> None:
    """Ray ``worker_process_setup_hook``: set ``RAY_ADDRESS`` in this worker to its own cluster.

    Ray Train V2 starts a ``PlacementGroupCleaner`` actor per run that frees the run's worker
    CPUs when its controller dies (as it does when Tune stops a trial). The cleaner asks Ray's
    state API with no address, which uses ``RAY_ADDRESS`` or else looks for Ray's processes on
    the host: with several Ray instances on one machine it fails ("Found multiple active Ray
    instances") or, if ``ray start`` left ``/tmp/ray/ray_current_cluster``, asks another
    cluster. Either way stopped trials keep their CPUs and a sweep can stall. Every worker of
    a job started by :func:`ensure_ray` runs this hook, so the cleaner asks its own cluster.
    """
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def ray_runtime_env(pythonpath: str | None = None) -> dict[str, Any]:
    """The job ``runtime_env`` for ``ray.init``: :func:`export_cluster_address` in every worker
    (and ``PYTHONPATH`` when given, so workers import this checkout)."""
    env: dict[str, Any] = {"worker_process_setup_hook": f"{__name__}.export_cluster_address"}
    if pythonpath:
        env["env_vars"] = {"PYTHONPATH": pythonpath}
    return env


def _submitted_setup_hook() -> bool:
    """Whether ``ray job submit`` gave this job its own worker_process_setup_hook (Ray refuses
    to merge two)."""
    try:
        injected = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    except ValueError:
        return False
    runtime_env = injected.get("runtime_env") or {}
    return ("worker_process_setup_hook" in runtime_env
            or WORKER_PROCESS_SETUP_HOOK_ENV_VAR in (runtime_env.get("env_vars") or {}))


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (as under ``ray job submit``) or start a local one.

    Locally Ray is given more logical CPUs than cores (at least 4): Train workers reserve
    CPUs for their whole life, and without spare logical CPUs Ray Data tasks could never be
    scheduled next to them on a 2-core machine (a hang, not an error). Either way the job's
    workers get ``RAY_ADDRESS`` of their cluster (:func:`export_cluster_address`), so Ray
    Train's cleanup finds it when other Ray instances run on the same host.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        if _submitted_setup_hook():
            log("the submitted job has its own worker_process_setup_hook; not adding the one that "
                 "sets RAY_ADDRESS in workers (see README, Tune: several Ray instances on one host)")
            ray.init(log_to_driver=True)
        else:
            ray.init(log_to_driver=True, runtime_env=ray_runtime_env())
        return
    cores = os.cpu_count() or 1
    # Workers must import ray_galaxy even when it is run from a checkout, not installed.
    root = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=num_cpus or max(4, cores + 2), include_dashboard=True,
             runtime_env=ray_runtime_env(pythonpath))


def storage_path(storage: str) -> str:
    """Ray needs absolute local paths; URIs pass through."""
    return absolute(storage)
