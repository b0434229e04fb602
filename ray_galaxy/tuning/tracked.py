"""A sweep in MLflow: one parent run, a child run per trial, the published model's run tagged.

The children are written by the driver after the sweep, from the trial rows and each trial's
Train history (every epoch it ran): Tune's trials run in their own actors, and recording from
here keeps one writer per run, also for a resumed or re-published sweep.
"""

from __future__ import annotations

from typing import Any, Mapping

from ray_galaxy.console import log
from ray_galaxy.storage import exists, join, read_bytes
from ray_galaxy.tracking import Tracker, resolve_uri, ui_command
from ray_galaxy.training.trainer import record_model
from ray_galaxy.tuning.config import TUNE_METRIC, TuneConfig
from ray_galaxy.tuning.space import SearchSpace

SWEEP_FILES = ("trials.png", "trials.md", "trials.csv")
ROW_NUMBERS = ("best_val_bpd", "best_epoch", "final_val_bpd", "final_val_psnr", "epochs_run", "morphology_distance")


def start_sweep(cfg: TuneConfig, space: SearchSpace) -> Tracker:
    """The sweep's parent run (params: the sweep config and its search space)."""
    params = {**cfg.to_dict(), "search_space": space.to_spec()}
    tracker = Tracker.start(resolve_uri(cfg.tracking, cfg.tracking_uri, cfg.storage), cfg.experiment,
                            cfg.name, params=params, tags={"job": "tune"})
    if tracker.enabled:
        log(f"tracking: MLflow run {tracker.run_id} (one child run per trial) in experiment "
            f"{cfg.experiment!r}; UI: {ui_command(str(tracker.uri))}")
    return tracker


def _trial_run(parent: Tracker, cfg: TuneConfig, row: Mapping[str, Any], params: Mapping[str, Any],
               history: list[dict[str, Any]]) -> Tracker:
    """One trial's child run: its hyperparameters, per-epoch metrics and ASHA outcome."""
    child = Tracker.start(parent.uri, parent.experiment, f"{cfg.name}/{row['trial_id']}", params=params,
                          tags={"job": "tune-trial", "trial_id": row["trial_id"], "status": row["status"],
                                "stopped_early": row["stopped_early"]}, parent=parent)
    child.log_history(history)
    child.log_metrics({k: row[k] for k in ROW_NUMBERS if row.get(k) is not None})
    if row.get("error"):
        child.set_tags({"error": row["error"]})
    child.end("FAILED" if row["status"] == "error" else "FINISHED")
    return child


def record_sweep(parent: Tracker, cfg: TuneConfig, rows: list[dict[str, Any]],
                 params_by_trial: Mapping[str, Mapping[str, Any]],
                 histories: Mapping[str, list[dict[str, Any]]], run_dir: str, model_dir: str) -> None:
    """Children for every trial, the best one tagged and holding the published model (its
    figures, metrics.json and run id), and the sweep's table and plot on the parent."""
    if not parent.enabled or not rows:
        return
    best_id = rows[0]["trial_id"]
    for row in rows:
        child = _trial_run(parent, cfg, row, params_by_trial.get(row["trial_id"], {}),
                           histories.get(row["trial_id"], []))
        if row["trial_id"] == best_id and exists(join(model_dir, "metrics.json")):
            child.set_tags({"best_trial": "true"})
            record_model(child, model_dir)
    best = rows[0]
    parent.log_metrics({f"best_{TUNE_METRIC}": best.get("best_val_bpd"), "trials": len(rows),
                        "stopped_early": sum(r["status"] == "stopped" for r in rows)})
    parent.set_tags({"best_trial": best_id, "model_dir": model_dir})
    parent.log_files({name: read_bytes(join(run_dir, name))
                      for name in SWEEP_FILES if exists(join(run_dir, name))})
