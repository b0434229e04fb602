"""Connecting a job to Ray: a local Ray of its own, or the cluster in ``RAY_ADDRESS``.

Every job that uses Ray (training, Tune, data preparation) calls :func:`ensure_ray` first:
without ``RAY_ADDRESS`` the job starts a local Ray of its own, whatever else runs on the
machine; with it (``RAY_ADDRESS=auto`` for the cluster ``ray start`` runs here) the job joins
that cluster, sends the ``ray_galaxy`` package to its workers unless ``ray job submit`` brought
the code, and checks that a worker can import it. Failures are a :class:`ClusterError` with
one clear line (docs/cluster.md). It also keeps Ray's own chatter out of the terminal
(:func:`quiet_ray`): progress bars, Ray Data's per-execution lines and Ray Train's per-report
dumps go to the files in Ray's log folder (:func:`ray_log_dir`) only, so what a job prints is
its own one line per step.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ray
import ray.data
from ray.exceptions import GetTimeoutError, RayError, WorkerCrashedError
from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
from ray._private import worker as ray_worker
from ray._private.ray_logging import global_worker_stdstream_dispatcher
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

from ray_galaxy.console import PREFIX, log
from ray_galaxy.storage import absolute, is_uri


# Lines Ray 2.60 prints on every Train run that no user can act on: an internal actor's restart
# caveat (ray-project/ray#53727) and the raylet's note that small machines start workers slowly.
RAY_NOISE = ("has constructor arguments in the object store and max_restarts > 0",
             "PYTHON worker processes have been started on node",
             # A lost node: the job says so itself (training.loop.group_line).
             "has been marked dead because the detector has missed too many heartbeats")
# Output the driver does not echo: Ray's own processes (a lost node's GCS and raylet errors, state
# dumps) and Ray Train's actors (a dead peer's tracebacks, the controller's retries). The job says
# in its own lines what happened (training.loop.group_line, the failure's one-line error) and
# names Ray's log folder, which keeps all of it.
RAY_INTERNAL_PIDS = ("gcs_server", "raylet", "autoscaler")
RAY_INTERNAL_ACTORS = ("TrainController", "RayTrainWorker", "PlacementGroupCleaner")


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


class _NoCpuWarning(logging.Filter):
    """Drops Ray Data's "does not have any available CPUs" warning (see :func:`quiet_ray`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "does not have any available CPUs" not in record.getMessage()


def quiet_ray() -> None:
    """Keep Ray Data's progress bars and its "Starting execution" / "execution finished" lines
    out of this process's terminal. Call before any dataset is made: a dataset carries the
    ``DataContext`` it was made with into the actors that run it."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Disabling the bars logs a warning that says so, once per process: it is our choice.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray 2.60 turns token auth on for every local instance and warns about it each time; the
    # token lives in ~/.ray/auth_token and docs/cluster.md says when `ray job submit` needs it.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    quiet_loggers("ray.data")
    # Ray Data warns that "the Dataset job will hang" whenever Train workers hold every CPU at
    # the moment a dataset starts; ours give the workers fractional CPUs so data tasks always
    # find one, and a real shortage still shows as no progress (and in ray-data.log).
    dataset_logger = logging.getLogger("ray.data.dataset")
    if not any(isinstance(f, _NoCpuWarning) for f in dataset_logger.filters):
        dataset_logger.addFilter(_NoCpuWarning())
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


# Connecting to a cluster that does not answer would retry for minutes; a closed port or an
# unknown host is known in seconds.
CONNECT_TIMEOUT_S = 5.0
# The first task on a joined cluster waits for a worker process and the job's runtime env (the
# uploaded package) on its node: seconds, more on a busy node. A worker that cannot import the
# package fails at once (no retries); this bounds only a cluster that starts no worker at all.
WORKER_CHECK_TIMEOUT_S = 120.0
PACKAGE_DIR = Path(__file__).resolve().parent


class ClusterError(RuntimeError):
    """Ray could not be started or joined, or the cluster's workers cannot run the job's code."""


def _submitted_runtime_env() -> dict[str, Any]:
    """The runtime_env ``ray job submit`` gave this driver (empty when it was not submitted)."""
    try:
        injected = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    except ValueError:
        return {}
    return injected.get("runtime_env") or {}


def _submitted_setup_hook() -> bool:
    """Whether ``ray job submit`` gave this job its own worker_process_setup_hook (Ray refuses
    to merge two)."""
    runtime_env = _submitted_runtime_env()
    return ("worker_process_setup_hook" in runtime_env
            or WORKER_PROCESS_SETUP_HOOK_ENV_VAR in (runtime_env.get("env_vars") or {}))


def _submitted_code() -> bool:
    """Whether ``ray job submit`` sent code with the job (``--working-dir`` or ``py_modules``):
    then it is not sent a second time (Ray would refuse to merge two ``py_modules`` anyway)."""
    runtime_env = _submitted_runtime_env()
    return bool(runtime_env.get("working_dir") or runtime_env.get("py_modules"))


def cluster_runtime_env() -> dict[str, Any]:
    """The job ``runtime_env`` for joining a cluster: :func:`setup_worker_process` in every worker
    (unless the submitted job has its own hook) and the ``ray_galaxy`` package uploaded to the
    cluster (``py_modules``) unless the submitted job brought the code."""
    env: dict[str, Any] = {} if _submitted_setup_hook() else ray_runtime_env()
    if not _submitted_code():
        env["py_modules"] = [str(PACKAGE_DIR)]
        # Bytecode is rebuilt on the workers; leaving it out keeps the upload's hash stable.
        env["excludes"] = ["__pycache__"]
    return env


def _host_port(address: str) -> tuple[str, int] | None:
    """Host and port of a ``host:port`` or ``ray://host:port`` address; None for ``auto`` and
    forms that Ray itself judges."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        return None
    return (parts.hostname, port) if parts.hostname and port else None


def _check_reachable(address: str) -> None:
    """Fail in seconds when nothing listens at ``address`` (Ray would retry for minutes)."""
    if address.split("://")[0] in ("http", "https"):
        raise ClusterError(f"RAY_ADDRESS={address} is a dashboard address, the one `ray job submit` "
                           "takes; a job joins a cluster at its GCS address (host:6379), or "
                           "RAY_ADDRESS=auto for the cluster `ray start` runs on this machine")
    host_port = _host_port(address)
    if host_port is None:
        return
    try:
        socket.create_connection(host_port, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterError(f"no Ray cluster at RAY_ADDRESS={address}: cannot connect to "
                           f"{host_port[0]}:{host_port[1]} ({e.strerror or e})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _connect(address: str, runtime_env: dict[str, Any]) -> None:
    """``ray.init`` on the cluster at ``address``; its errors as one :class:`ClusterError`."""
    try:
        ray.init(log_to_driver=True, runtime_env=runtime_env, logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, bare Exception
        ray.shutdown()
        causes, cause = [], e
        while cause is not None:
            causes.append(str(cause))
            cause = cause.__cause__
        hint = ""
        if "Authentication" in " ".join(causes) and not os.environ.get("RAY_AUTH_MODE"):
            hint = ("; the cluster uses token authentication: set RAY_AUTH_MODE=token (the token "
                    "is read from ~/.ray/auth_token or RAY_AUTH_TOKEN)")
        raise ClusterError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: "
                           f"{_first_line(e)}{hint}") from e


def _package_file() -> str:
    """Run on a worker: where it imports ``ray_galaxy`` from. Ray ships this function by
    reference, so the worker must import this module to run it."""
    return __file__


def _check_workers_import(timeout_s: float = WORKER_CHECK_TIMEOUT_S) -> None:
    """Fail at once, not in a Ray Data task retried forever, when the cluster's workers cannot
    import ``ray_galaxy`` (or cannot start at all)."""
    ref = ray.remote(num_cpus=0, max_retries=0)(_package_file).remote()
    fix = ("run the job with `ray job submit --working-dir .` from the repository root, or "
           "install ray_galaxy on the cluster")
    try:
        ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        raise ClusterError(f"no worker of the cluster could import ray_galaxy within {timeout_s:.0f}s "
                           f"(Ray's logs: {ray_log_dir()}); {fix}") from None
    except WorkerCrashedError as e:
        # A worker whose setup hook (ray_galaxy.runtime) cannot be imported dies as it starts.
        raise ClusterError("a worker of the cluster died as it started, most likely unable to import "
                           f"ray_galaxy (its traceback is above and in {ray_log_dir()}); {fix}") from e
    except RayError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        raise ClusterError(f"the cluster's workers cannot import ray_galaxy "
                           f"({lines[-1] if lines else type(e).__name__}); {fix}") from e


def _resources() -> str:
    res = ray.cluster_resources()
    return f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"


def _join(address: str) -> None:
    """Join the cluster at ``address`` (RAY_ADDRESS) with the job's code, or raise ClusterError."""
    _check_reachable(address)
    if _submitted_setup_hook():
        log("the submitted job has its own worker_process_setup_hook; not adding the one that "
            "sets RAY_ADDRESS in workers (see docs/tune.md: several Ray instances on one host)")
    code = ("the submitted job's code" if _submitted_code()
            else f"ray_galaxy uploaded from {PACKAGE_DIR}")
    _connect(address, cluster_runtime_env())
    try:
        _check_workers_import()
    except ClusterError:
        ray.shutdown()
        raise
    log(f"Ray: joined the cluster at {ray.get_runtime_context().gcs_address} "
        f"(RAY_ADDRESS={address}): {_resources()}; workers run {code}")


def _start_local(num_cpus: int | None) -> None:
    """Start a local Ray for this job alone, even when ``ray start`` runs a cluster here."""
    cores = os.cpu_count() or 1
    # Workers must import ray_galaxy even when it is run from a checkout, not installed.
    pythonpath = os.pathsep.join(p for p in (str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")) if p)
    try:
        # address="local": without it ray.init joins the cluster `ray start` left in
        # /tmp/ray/ray_current_cluster, and then refuses num_cpus.
        ray.init(address="local", num_cpus=num_cpus or max(4, cores + 2), include_dashboard=True,
                 runtime_env=ray_runtime_env(pythonpath), logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 - Ray raises RuntimeError, ValueError, bare Exception
        ray.shutdown()
        raise ClusterError(f"cannot start a local Ray: {_first_line(e)}") from e
    log(f"Ray: started a local instance for this job at {ray.get_runtime_context().gcs_address}: "
        f"{_resources()} (RAY_ADDRESS=auto joins a cluster running here instead)")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (``auto``: the one ``ray start`` runs on this machine)
    or start a local Ray of this job's own; one line says which, with its CPUs and GPUs.

    Joining, the job's code goes with it (:func:`cluster_runtime_env`) and a worker must import
    it within :data:`WORKER_CHECK_TIMEOUT_S`. Locally Ray is given more logical CPUs than
    cores (at least 4): Train workers reserve CPUs for their whole life, and without spare
    logical CPUs Ray Data tasks could never be scheduled next to them on a 2-core machine (a
    hang, not an error). Either way the job's workers get ``RAY_ADDRESS`` of their cluster
    (:func:`export_cluster_address`), so Ray Train's cleanup finds it when other Ray instances
    run on the same host, and Ray's own progress output stays in its log folder
    (:func:`quiet_ray`, in the driver and the workers). Raises :class:`ClusterError` when Ray
    cannot be started or joined, or its workers cannot import the package.
    """
    quiet_ray()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and address != "local":
        _join(address)
    else:
        _start_local(num_cpus)
    filter_worker_output()


def _drop_noise(handler: Any, drop_internal: bool = True) -> Any:
    """``handler`` (one of Ray's printers of worker output) without :data:`RAY_NOISE`, and with
    ``drop_internal`` without the output of Ray's internals; the package's own lines as they are."""
    def filtered(batch: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        lines = [line for line in batch.get("lines", []) if not any(n in line for n in RAY_NOISE)]
        ours = [line for line in lines if line.startswith(PREFIX)]
        internal = drop_internal and (batch.get("pid") in RAY_INTERNAL_PIDS
                                      or str(batch.get("actor_name") or "").startswith(RAY_INTERNAL_ACTORS))
        theirs = [] if internal else [line for line in lines if not line.startswith(PREFIX)]
        if ours:
            # Written as they are: Ray's handler would prefix them, and its de-duplication folds
            # lines that differ only in numbers (two trials' epoch lines) into one.
            sink = sys.stderr if batch.get("is_err") else sys.stdout
            sink.write("".join(line + "\n" for line in ours))
            sink.flush()
        if theirs:
            handler({**batch, "lines": theirs}, *args, **kwargs)
    return filtered


def filter_worker_output() -> None:
    """Drop :data:`RAY_NOISE` and the output of Ray's internals (:data:`RAY_INTERNAL_PIDS`,
    :data:`RAY_INTERNAL_ACTORS`) from the worker output Ray streams to this driver (Ray's log
    folder keeps every line), and print the package's own progress lines from workers (one per
    epoch) without Ray's ``(RayTrainWorker pid=...)`` prefix, as the driver's own lines are. Ray
    has no public hook for this, hence its private dispatcher."""
    for name, handler in list(global_worker_stdstream_dispatcher.handlers):
        if name == "ray_print_logs":
            global_worker_stdstream_dispatcher.remove_handler(name)
            global_worker_stdstream_dispatcher.add_handler(name, _drop_noise(handler))
    # Cluster errors (a node declared dead, ...) reach the driver through another private path,
    # looked up by name on every message.
    if not getattr(ray_worker.print_to_stdstream, "_ray_galaxy_filtered", False):
        # Not drop_internal: the cluster's other errors (a task killed for memory) are the user's business.
        printer = _drop_noise(ray_worker.print_to_stdstream, drop_internal=False)
        printer._ray_galaxy_filtered = True  # type: ignore[attr-defined]
        ray_worker.print_to_stdstream = printer


def storage_path(storage: str) -> str:
    """Ray needs absolute local paths; URIs pass through."""
    return absolute(storage)


def warn_relative_storage(storage: str) -> None:
    """One warning line when a submitted job's ``storage`` is a relative local path: the job runs
    in Ray's temporary copy of its working dir, so that is where its runs would go, and they
    would go with the Ray session."""
    if is_uri(storage) or os.path.isabs(os.path.expanduser(storage)):
        return
    if not _submitted_runtime_env().get("working_dir"):
        return
    log(f"warning: --storage {storage!r} is relative, and a submitted job runs in Ray's temporary copy "
        f"of its working dir: it resolves to {storage_path(storage)}, which is removed with the Ray "
        "session. Give an absolute path (on storage every node sees) or s3://...")
