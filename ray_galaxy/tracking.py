"""Experiment tracking with MLflow: the one module that talks to it (training, tuning and
evaluation go through :class:`Tracker`).

Where runs go: ``--tracking-uri`` (a field of each job's config), else ``MLFLOW_TRACKING_URI``,
else a local SQLite store in the job's storage (``<storage>/mlflow.db``, artifacts in
``<storage>/mlartifacts``) that needs no server. ``--no-tracking`` turns it off.

Tracking never breaks a job: every MLflow call is guarded; the first failure prints one
warning line and turns tracking off for the rest of the job. Remote servers are probed with
short HTTP timeouts and few retries, so an unreachable one costs seconds, not minutes.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ray_galaxy.console import log
from ray_galaxy.storage import is_remote

DEFAULT_EXPERIMENT = "ray-galaxy"
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
ENV_URI = "MLFLOW_TRACKING_URI"
PARENT_TAG = "mlflow.parentRunId"  # how MLflow (and its UI) knows a child run's parent
# MLflow's defaults (7 retries with exponential backoff, 120 s timeout) make an unreachable
# server hang a job for minutes; a user who sets these variables keeps their own values.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
MAX_PARAM_CHARS = 6000  # MLflow's limit on one parameter value


def default_uri(storage: str) -> str:
    """The local store of a job whose storage is ``storage``: ``sqlite:///<abs>/mlflow.db``
    (``./runs/mlflow.db`` when the storage is remote, since SQLite needs a local file)."""
    folder = Path("runs") if is_remote(storage) else Path(storage).expanduser()
    return "sqlite:///" + str((folder / LOCAL_DB).resolve())


def resolve_uri(enabled: bool, tracking_uri: str, storage: str) -> str | None:
    """The tracking URI a job uses (None: tracking is off)."""
    if not enabled:
        return None
    return tracking_uri or os.environ.get(ENV_URI) or default_uri(storage)


def ui_command(uri: str) -> str:
    """The command that opens the tracking UI on ``uri`` (a server already has its own)."""
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri}"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``a.b.c`` keys (MLflow's params and metrics are flat)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among flattened ``values`` (lists, strings and None are left out)."""
    out = {}
    for k, v in flatten(values).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _param_text(v: Any) -> str:
    text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return text[:MAX_PARAM_CHARS]


def _local_artifacts(uri: str) -> str | None:
    """Artifacts of a local SQLite store live beside its database (MLflow's default would be
    ./mlruns under whatever folder the job was started from)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).parent.joinpath(LOCAL_ARTIFACTS).as_uri()


def _client(uri: str) -> Any:
    # Lazy: importing mlflow takes seconds, and jobs with tracking off never pay for it.
    import mlflow

    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)
    # Schema migrations of a new SQLite store log dozens of INFO lines; the job's output is for people.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(tracking_uri=uri)


@dataclass
class Tracker:
    """One MLflow run (or none): every method is safe to call, also when tracking is off."""

    uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_id: str | None = None
    _client_obj: Any = None

    @property
    def enabled(self) -> bool:
        """Whether calls still reach a run (False once tracking is off)."""
        return self.uri is not None and self.run_id is not None

    def spec(self) -> dict[str, str] | None:
        """Where the run is, as recorded in metrics.json and passed to Train workers."""
        if not self.enabled:
            return None
        return {"uri": str(self.uri), "run_id": str(self.run_id), "experiment": self.experiment}

    @classmethod
    def attach(cls, spec: Mapping[str, Any] | None) -> "Tracker":
        """The run that :meth:`spec` describes (a disabled tracker for None)."""
        if not spec or not spec.get("uri") or not spec.get("run_id"):
            return cls()
        return cls(uri=spec["uri"], experiment=spec.get("experiment", DEFAULT_EXPERIMENT),
                   run_id=spec["run_id"])

    @classmethod
    def start(cls, uri: str | None, experiment: str, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None, parent: "Tracker | None" = None) -> "Tracker":
        """A new run in ``experiment`` (created when missing); disabled when ``uri`` is None or
        the store cannot be reached (one warning)."""
        t = cls(uri=uri, experiment=experiment)
        if uri is None:
            return t
        t.run_id = t._guard("starting a run", lambda: t._create_run(run_name, tags, parent))
        if t.run_id is not None and params:
            t.log_params(params)
        return t

    def _create_run(self, run_name: str, tags: Mapping[str, str] | None, parent: "Tracker | None") -> str:
        client = self._client()
        exp = client.get_experiment_by_name(self.experiment)  # also the probe of a remote server
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(
            self.experiment, artifact_location=_local_artifacts(str(self.uri)))
        all_tags = dict(tags or {})
        if parent is not None and parent.enabled:
            all_tags[PARENT_TAG] = str(parent.run_id)
        return client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id

    def _client(self) -> Any:
        if self._client_obj is None:
            self._client_obj = _client(str(self.uri))
        return self._client_obj

    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()``, or None after one warning that turns tracking off for good."""
        if self.uri is None:
            return None
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - tracking never breaks a job
            cause = (str(e).strip().splitlines() or [""])[0][:200]
            log(f"warning: experiment tracking is off for the rest of this job: {what} at "
                f"{self.uri} failed ({type(e).__name__}: {cause})")
            self.uri = None
            return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters (nested keys flattened, lists joined with commas)."""
        if not self.enabled:
            return
        from mlflow.entities import Param  # lazy: see _client

        items = [Param(k, _param_text(v)) for k, v in sorted(flatten(params).items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._guard("logging parameters",
                        lambda b=items[i:i + 100]: self._client().log_batch(self.run_id, params=b))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """The finite numbers of ``metrics`` (flattened), at ``step``."""
        self.log_history([metrics], step_key=None, first_step=step or 0)

    def log_history(self, rows: list[Mapping[str, Any]], step_key: str | None = "epoch",
                    first_step: int = 0) -> None:
        """Several steps of metrics at once (one row per step; its step is ``row[step_key]``)."""
        if not self.enabled or not rows:
            return
        from mlflow.entities import Metric  # lazy: see _client

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(row.get(step_key, first_step + i)) if step_key else first_step + i)
                 for i, row in enumerate(rows) for k, v in sorted(numeric(row).items()) if k != step_key]
        for i in range(0, len(items), 1000):  # MLflow's batch limit
            self._guard("logging metrics",
                        lambda b=items[i:i + 1000]: self._client().log_batch(self.run_id, metrics=b))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags (values as text)."""
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag  # lazy: see _client

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._guard("setting tags", lambda: self._client().log_batch(self.run_id, tags=items))

    def log_files(self, files: Mapping[str, bytes], folder: str | None = None) -> None:
        """Artifacts from bytes: ``{file name: content}``, under ``folder`` in the run."""
        if not self.enabled or not files:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                Path(tmp, name).write_bytes(data)
            self._guard("uploading artifacts",
                        lambda: self._client().log_artifacts(self.run_id, tmp, artifact_path=folder))

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED (or FAILED / KILLED)."""
        if self.enabled:
            self._guard("ending the run", lambda: self._client().set_terminated(self.run_id, status))
