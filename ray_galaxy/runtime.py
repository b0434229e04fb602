"""Connecting a job to Ray: a local Ray of its own, or the cluster in ``RAY_ADDRESS``.

Every job that uses Ray (training, Tune, data preparation) calls :func:`ensure_ray` first. It
also keeps Ray's own chatter out of the terminal (:func:`quiet_ray`): progress bars, Ray Data's
per-execution lines and Ray Train's per-report dumps go to the files in Ray's log folder
(:func:`ray_log_dir`) only, so what a job prints is its own one line per step.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import ray
import ray.data
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


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers of ``logger`` that write to the terminal (not Ray's log files)."""
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def quiet_loggers(*names: str) -> None:
    """Only warnings and errors of these loggers reach the terminal; their log files keep
    everything (Ray Data and Ray Train write theirs in :func:`ray_log_dir`)."""
    for name in names:
        for handler in _console_handlers(logging.getLogger(name) if name else logging.getLogger()):
            handler.setLevel(max(handler.level, logging.WARNING))


def quiet_ray() -> None:
    """Keep Ray Data's progress bars and its "Starting execution" / "execution finished" lines
    out of this process's terminal. Call before any dataset is made: a dataset carries the
    ``DataContext`` it was made with into the actors that run it."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Disabling the bars logs a warning that says so, once per process: it is our choice.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    quiet_loggers("ray.data")
    # data.py filters rows with Python predicates (paths hashed to the validation split), which
    # Ray Data's expressions cannot say; Ray warns on every such filter call.
    warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'", category=UserWarning)


def quiet_train_worker() -> None:
    """In a Ray Train worker: Ray Train sets up its loggers (and the root logger) to print INFO,
    e.g. a ``Reporting training result N: TrainingReport(...)`` dump per report; keep those in
    its log files. Runs at the start of the training function, after Ray Train's setup."""
    quiet_loggers("", "ray.train", "ray.data")


def setup_worker_process() -> None:
    """Ray ``worker_process_setup_hook`` of every job :func:`ensure_ray` starts: the worker asks
    its own cluster (:func:`export_cluster_address`) and prints no Ray Data chatter
    (:func:`quiet_ray`: the actors that run datasets for Train log each execution)."""
    export_cluster_address()
    quiet_ray()


def ray_log_dir() -> str:
    """Ray's log folder of this session (workers' output, ray-data.log, train/ logs)."""
    node = ray._private.worker._global_node  # no public API names the session's log folder
    if node is None:
        return "(Ray is not running)"
    return os.path.join(node.get_session_dir_path(), "logs")


def ray_runtime_env(pythonpath: str | None = None) -> dict[str, Any]:
    """The job ``runtime_env`` for ``ray.init``: :func:`setup_worker_process` in every worker
    (and ``PYTHONPATH`` when given, so workers import this checkout)."""
    env: dict[str, Any] = {"worker_process_setup_hook": f"{__name__}.setup_worker_process"}
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
    Train's cleanup finds it when other Ray instances run on the same host, and Ray's own
    progress output stays in its log folder (:func:`quiet_ray`, in the driver and the workers).
    """
    quiet_ray()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        if _submitted_setup_hook():
            log("the submitted job has its own worker_process_setup_hook; not adding the one that "
                 "sets RAY_ADDRESS in workers (see docs/tune.md: several Ray instances on one host)")
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
