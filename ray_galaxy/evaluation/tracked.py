"""An evaluation in MLflow: its numbers and report figures join the run of the model it
evaluated (found in the model directory's metrics.json), or a new run when the model has none."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ray_galaxy.console import log
from ray_galaxy.evaluation.config import EvaluateConfig
from ray_galaxy.tracking import Tracker, resolve_uri

# The sections of the evaluation's metrics.json that hold its results (the rest describes inputs).
RESULT_SECTIONS = ("likelihood", "reconstruction", "morphology", "sharpness", "memorisation", "means_only",
                   "classes", "properties", "realism")  # lists (per-class, per-selection rows) are left out
LOCAL_STORAGE = "./runs"  # where the local store is when the model has no run: jobs/train.py's default


def evaluation_run(cfg: EvaluateConfig, model_metrics: Mapping[str, Any]) -> Tracker:
    """The model's own run when it has one (and no other store was asked for), else a new run."""
    if not cfg.tracking:
        return Tracker()
    spec = model_metrics.get("tracking") or None
    if spec and (not cfg.tracking_uri or cfg.tracking_uri == spec.get("uri")):
        return Tracker.attach(spec)
    name = f"evaluate {Path(str(cfg.model).rstrip('/')).parent.name or cfg.model}"
    return Tracker.start(resolve_uri(True, cfg.tracking_uri, LOCAL_STORAGE), cfg.experiment, name,
                         params=cfg.to_dict(), tags={"job": "evaluate", "model_dir": cfg.model})


def record_evaluation(cfg: EvaluateConfig, model_metrics: Mapping[str, Any], metrics: Mapping[str, Any],
                      out: Path, figures: list[str]) -> Tracker:
    """Log the evaluation's numbers (``eval.<section>.<name>``), report.md, metrics.json and its
    figures (under ``evaluation/`` in the run); the run used (disabled if none)."""
    tracker = evaluation_run(cfg, model_metrics)
    if not tracker.enabled:
        return tracker
    tracker.log_metrics({"eval": {k: metrics[k] for k in RESULT_SECTIONS if metrics.get(k)}})
    files = [*figures, "report.md", "metrics.json"]
    tracker.log_files({name: (out / name).read_bytes() for name in files if (out / name).is_file()},
                      folder="evaluation")
    tracker.set_tags({"evaluation": str(out.resolve()), "evaluation.data": cfg.data})
    if tracker.enabled:
        log(f"tracking: evaluation recorded in MLflow run {tracker.run_id} (experiment {tracker.experiment!r})")
    return tracker
