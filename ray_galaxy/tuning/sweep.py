"""Running a sweep: a Tuner with ASHA whose trials each fit one Ray Train run.

The driver (:func:`tune`) reads and decodes the data once, then runs a Tuner whose trials are
function trainables (:func:`run_trial`). Each trial builds and fits one ``TorchTrainer`` (the
same one ``jobs/train.py`` uses) and forwards every per-epoch Train report to Tune with a
``TuneReportCallback``, so ASHA can stop poor trials early. Ray 2.60 runs Train V2, where
``Tuner(trainer)`` no longer works; this is the pattern that replaces it.

Afterwards the driver writes, under ``<storage>/<name>/``:

    trials.csv / trials.md   every trial: hyperparameters, best/final val_bpd, epochs, early stop
    trials.png               best val_bpd against each searched hyperparameter
    model/                   the best trial's best checkpoint as a model directory
    candidates/<trial_id>/   with --metric morphology: each completed trial's model, as ranked
    trials/<trial_id>/       each trial's Ray Train run (checkpoints)
    sweep.json               the settings the sweep started with, and the data counts

Running the same sweep (same name and storage) again resumes it if it was interrupted
(Tune's ``Tuner.restore``), or, if every trial ended, publishes its results again.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import ray.tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.tune import ExperimentAnalysis
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from ray_galaxy.checkpoint import ModelDirError
from ray_galaxy.config import ConfigError, TrainConfig
from ray_galaxy.console import fmt_seconds, log
from ray_galaxy.data import DataError
from ray_galaxy.plots import png
from ray_galaxy.runtime import ClusterError, ensure_ray, storage_path, warn_relative_storage
from ray_galaxy.storage import StorageError, copy_folder, exists, join, read_bytes, write_bytes
from ray_galaxy.streaming import load_datasets
from ray_galaxy.tracking import Tracker
from ray_galaxy.training.trainer import make_trainer
from ray_galaxy.tuning.config import (SWEEP_FILE, TUNE_METRIC, TUNE_MODE, TuneConfig, base_train_config,
                                      check_search_space, run_dir, settings_differences, sweep_settings,
                                      trial_train_config, trials_storage)
from ray_galaxy.tuning.ranking import candidates_dir, rank_by_morphology, validation_morphology
from ray_galaxy.tuning.results import (export_best, fmt, plot_trials, rows_csv, rows_markdown,
                                       train_history, trial_rows, trial_states)
from ray_galaxy.tuning.space import SearchSpace, parse_search_space
from ray_galaxy.tuning.tracked import record_sweep, start_sweep

# --------------------------------------------------------------------------- trial side

# Tune's trial table shows the first four numeric metrics of a result; the training loop
# reports train_* first, so without reordering the table would hide val_bpd.
FIRST_METRICS = ("epoch", TUNE_METRIC, "val_psnr", "epoch_seconds")


class MetricsFirstCallback(TuneReportCallback):
    """A TuneReportCallback that puts the metrics people read first."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        """Forward Train's report to Tune with :data:`FIRST_METRICS` first."""
        ordered = [{**{k: m[k] for k in FIRST_METRICS if k in m}, **m} for m in metrics]
        super().after_report(run_context, ordered, checkpoint)


def run_trial(config: dict[str, Any], *, base: dict[str, Any], train_ds: Any, val_ds: Any,
              storage: str) -> None:
    """One Tune trial: fit one Ray Train run of ``base`` with the sampled ``config``.

    Runs inside the trial's (nearly resource-free) actor, which only drives the Train
    controller; the work happens in the Train workers.
    """
    # The trial id names the Train run: unique across sweeps, so a trial never resumes another
    # trial's (or an earlier sweep's) checkpoints, while Train's own restarts after a worker
    # failure (max_failures) still resume this run's.
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_train_config(base, config, name=trial_id)
    run_config = RunConfig(
        name=trial_id,
        storage_path=storage,
        callbacks=[MetricsFirstCallback()],
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        # Score checkpoints by the sweep's metric, so the kept "best" is the one exported.
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                           checkpoint_score_attribute=TUNE_METRIC,
                                           checkpoint_score_order=TUNE_MODE),
    )
    # Trials train side by side: their epoch lines say which trial they are from.
    make_trainer(cfg, train_ds, val_ds, extra_loop_config={"tag": f"trial {trial_id}: "},
                 run_config=run_config).fit()


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _trial_dirname(trial: Any) -> str:
    # Short and equal to the Train run's name; the default embeds every parameter value.
    return trial.trial_id


# --------------------------------------------------------------------------- resume


@dataclass
class Sweep:
    """One sweep as the driver runs it: its settings, parsed space, base config and place."""

    cfg: TuneConfig
    space: SearchSpace
    base: TrainConfig
    run_dir: str
    n_trials: int
    settings: dict[str, Any]


class ResumePlan(NamedTuple):
    """What this run of a sweep does: ``new``, ``resume`` or ``finished`` (publish again),
    with Tune's saved state (an ExperimentAnalysis) and the saved sweep.json when there is one."""

    kind: str
    analysis: Any = None
    saved: dict[str, Any] | None = None


def _read_sweep_file(where: str) -> dict[str, Any] | None:
    path = join(where, SWEEP_FILE)
    return json.loads(read_bytes(path)) if exists(path) else None


def _saved_trials(where: str) -> Any:
    """Tune's saved state of the sweep in ``where`` (an ExperimentAnalysis), or None if no
    trial state was saved yet."""
    try:
        return ExperimentAnalysis(where, default_metric=TUNE_METRIC, default_mode=TUNE_MODE)
    except (FileNotFoundError, ValueError, RuntimeError):
        return None


def _check_saved_settings(sweep: Sweep, saved: dict[str, Any] | None) -> None:
    if saved is None:
        log(f"{sweep.run_dir} holds a sweep without {SWEEP_FILE} (started by an older version); "
            "its settings cannot be checked against these")
        return
    diffs = settings_differences(saved.get("settings") or {}, sweep.settings)
    if diffs:
        raise ConfigError(
            f"sweep {sweep.cfg.name!r} in {sweep.run_dir} was started with other settings ("
            + "; ".join(diffs) + "); rerun with the settings it started with to resume it, "
            "or choose a new --name for a new sweep")


def resume_plan(sweep: Sweep) -> ResumePlan:
    """Decide what a run of the sweep does (see :class:`ResumePlan`).

    Raises a :class:`ConfigError` if the saved sweep was started with other settings.
    """
    if not ray.tune.Tuner.can_restore(sweep.run_dir):
        return ResumePlan("new")
    saved = _read_sweep_file(sweep.run_dir)
    _check_saved_settings(sweep, saved)
    analysis = _saved_trials(sweep.run_dir)
    if analysis is None:
        log(f"{sweep.run_dir}: the sweep was stopped before Tune saved any trial; starting it anew")
        return ResumePlan("new")
    trials = list(analysis.trials or [])
    if len(trials) >= sweep.n_trials and all(str(t.status) == "TERMINATED" for t in trials):
        return ResumePlan("finished", analysis, saved)
    return ResumePlan("resume", analysis, saved)


def _announce(sweep: Sweep, plan: ResumePlan) -> None:
    name, where, n = sweep.cfg.name, sweep.run_dir, sweep.n_trials
    previous = list(getattr(plan.analysis, "trials", None) or [])
    if plan.kind == "finished":
        log(f"sweep {name!r} already finished ({len(previous)} trials) in {where}: nothing to "
            "run; publishing its results again (choose a new --name for a new sweep)")
    elif plan.kind == "resume":
        counts = {s: sum(str(t.status) == s for t in previous) for s in ("TERMINATED", "ERROR")}
        unfinished = len(previous) - counts["TERMINATED"] - counts["ERROR"]
        log(f"resuming the interrupted sweep {name!r} in {where}: {counts['TERMINATED']} of "
            f"{n} trials ended; {unfinished} unfinished and {counts['ERROR']} failed continue "
            f"from their last checkpoints; {max(0, n - len(previous))} not started yet")
    else:
        log(f"starting a new sweep {name!r} in {where}")


# --------------------------------------------------------------------------- driver side


@dataclass
class TuneResult:
    """What a finished sweep produced."""

    run_dir: str
    model_dir: str
    best: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)


def _prepare(cfg: TuneConfig) -> Sweep:
    """Parse and check everything that can be checked before Ray starts."""
    space = parse_search_space(cfg.search_space)
    base = base_train_config(cfg)
    check_search_space(space, base)
    return Sweep(cfg=cfg, space=space, base=base, run_dir=run_dir(cfg),
                 n_trials=space.num_trials(cfg.num_samples), settings=sweep_settings(cfg, space, base))


def _load_data(sweep: Sweep) -> tuple[Any, Any, dict[str, Any]]:
    """The train and val datasets, read and decoded once for all trials (cached: trials share it;
    each epoch's order seeded by the base config's seed), and their counts."""
    base = sweep.base
    train_ds, val_ds, stats = load_datasets(base.data, base.image_size, base.crop, base.val_fraction,
                                            cache="on", seed=base.seed)
    log(f"data: {stats.train_images} train / {stats.val_images} val images from {stats.files} files "
        f"in {stats.seconds:.1f}s; skipped {stats.skipped} {stats.skipped_by_reason or ''}")
    return train_ds, val_ds, stats.to_dict()


def _tuner(sweep: Sweep, plan: ResumePlan, train_ds: Any, val_ds: Any) -> ray.tune.Tuner:
    """A new Tuner with ASHA, or the interrupted one restored."""
    cfg = sweep.cfg
    # with_parameters puts the datasets in the object store once for all trials.
    trainable = ray.tune.with_parameters(run_trial, base=sweep.base.to_dict(), train_ds=train_ds,
                                         val_ds=val_ds, storage=trials_storage(cfg))
    trainable = ray.tune.with_resources(trainable, ray.tune.PlacementGroupFactory([{"CPU": cfg.trial_cpus}]))
    if plan.kind == "resume":
        # Unfinished and failed trials continue under their trial ids, so each one's Ray
        # Train run resumes from its latest checkpoint; trials not created yet are sampled
        # by the restored search algorithm.
        return ray.tune.Tuner.restore(sweep.run_dir, trainable=trainable, resume_errored=True)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.epochs, grace_period=cfg.grace_period,
                              reduction_factor=cfg.reduction_factor)
    # The concurrency limit goes on the generator itself: Tune ignores (with only a log line)
    # TuneConfig.max_concurrent_trials once a BasicVariantGenerator is passed.
    search = BasicVariantGenerator(max_concurrent=cfg.max_concurrent_trials, random_state=cfg.seed)
    return ray.tune.Tuner(
        trainable,
        param_space=sweep.space.param_space(),
        tune_config=ray.tune.TuneConfig(metric=TUNE_METRIC, mode=TUNE_MODE, num_samples=cfg.num_samples,
                                        scheduler=scheduler, search_alg=search,
                                        trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_dirname),
        run_config=ray.tune.RunConfig(name=cfg.name, storage_path=storage_path(cfg.storage)),
    )


def _run(sweep: Sweep, plan: ResumePlan) -> tuple[Any, dict[str, Any]]:
    """Tune's results and the data counts: from the saved state of a finished sweep, or by
    running (or resuming) the Tuner."""
    stats = (plan.saved or {}).get("data") if plan.kind == "finished" else None
    if plan.kind == "finished":
        if stats is None:  # a sweep saved by an older version: count the data again
            stats = _load_data(sweep)[2]
        return ray.tune.ResultGrid(plan.analysis), stats
    train_ds, val_ds, stats = _load_data(sweep)
    # Before the Tuner starts: a sweep that can be restored always has its settings.
    write_bytes(join(sweep.run_dir, SWEEP_FILE), json.dumps(
        {"format": 1, "settings": sweep.settings, "data": stats}, indent=1).encode())
    return _tuner(sweep, plan, train_ds, val_ds).fit(), stats


def _rows(sweep: Sweep, plan: ResumePlan, results: Any) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """The trial rows, best first, and each trial's per-epoch history."""
    saved_now = _saved_trials(sweep.run_dir) if plan.kind != "finished" else None
    saved_status = {str(t.trial_id): str(t.status) for t in getattr(saved_now, "trials", None) or []}
    histories = {tid: train_history(join(trials_storage(sweep.cfg), tid))
                 for tid, _ in trial_states(results)}
    return trial_rows(results, sweep.space, sweep.cfg.epochs, saved_status, histories), histories


def _write_tables(sweep: Sweep, rows: list[dict[str, Any]], model_dir: str) -> None:
    write_bytes(join(sweep.run_dir, "trials.csv"), rows_csv(rows))
    write_bytes(join(sweep.run_dir, "trials.md"), rows_markdown(rows, sweep.cfg, sweep.space, model_dir))
    write_bytes(join(sweep.run_dir, "trials.png"), png(plot_trials(rows, sweep.space)))
    log(f"trials table: {join(sweep.run_dir, 'trials.md')} (and trials.csv, trials.png)")


def _summarise(sweep: Sweep, rows: list[dict[str, Any]], model_dir: str, t0: float) -> None:
    n = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "error", "interrupted")}
    interrupted = f", {n['interrupted']} interrupted" if n["interrupted"] else ""
    log(f"{len(rows)} trials: {n['completed']} completed, {n['stopped']} stopped early by ASHA, "
        f"{n['error']} failed{interrupted}; total {fmt_seconds(time.time() - t0)}")
    if n["interrupted"] or len(rows) < sweep.n_trials:
        log(f"the sweep is unfinished ({len(rows)} of {sweep.n_trials} trials created, "
            f"{n['interrupted']} interrupted): run the same command again to resume it")
    best = rows[0]
    morph = (f", morphology distance {best['morphology_distance']:.3f} (rank {best['rank_val_bpd']} by "
             f"{TUNE_METRIC})" if best.get("morphology_distance") is not None else "")
    log(f"best trial {best['trial_id']}: {TUNE_METRIC} {best['best_val_bpd']:.4f} at epoch "
        f"{best['best_epoch']}{morph} (" + ", ".join(f"{p}={fmt(best[p])}" for p in sweep.space.names) + ")")
    log(f"model directory: {model_dir}")


def _rank(sweep: Sweep, rows: list[dict[str, Any]], params_by_trial: dict[str, dict[str, Any]],
          stats: dict[str, Any], model_dir: str) -> list[dict[str, Any]]:
    """Export the best trial as ``model_dir``: by val_bpd (rows as they are), or with
    ``--metric morphology`` after ranking the completed trials by their samples' morphology."""
    cfg, base = sweep.cfg, sweep.base

    def export(row: dict[str, Any], where: str) -> None:
        export_best(cfg, base, row, sweep.space, params_by_trial[row["trial_id"]], len(rows), stats, where)

    if cfg.metric == "morphology":
        real = validation_morphology(cfg.data, base.image_size, base.crop, base.val_fraction, base.seed)
        rows = rank_by_morphology(rows, export, real, sweep.run_dir, cfg.rank_samples, base.seed)
        if rows[0]["morphology_distance"] is not None:
            copy_folder(candidates_dir(sweep.run_dir, rows[0]["trial_id"]), model_dir)
            return rows
        log("ranking by morphology: no trial completed every epoch; publishing the best by val_bpd")
    export(rows[0], model_dir)
    return rows


def _publish(sweep: Sweep, plan: ResumePlan, results: Any, stats: dict[str, Any], t0: float,
             tracker: Tracker) -> TuneResult:
    """Export the best trial's model, write the trials table and plot, record the sweep in
    MLflow, say what happened."""
    rows, histories = _rows(sweep, plan, results)
    params_by_trial = {tid: dict(r.config or {}) for r, (tid, _) in zip(results, trial_states(results))}
    model_dir = join(sweep.run_dir, "model")
    if not rows or rows[0]["best_val_bpd"] is None:
        _write_tables(sweep, rows, model_dir)
        errors = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"])[:2000]
        raise RuntimeError(f"sweep {sweep.cfg.name!r}: no trial reported {TUNE_METRIC} "
                           f"({errors or 'no trials'})")
    rows = _rank(sweep, rows, params_by_trial, stats, model_dir)
    _write_tables(sweep, rows, model_dir)
    record_sweep(tracker, sweep.cfg, rows, params_by_trial, histories, sweep.run_dir, model_dir)
    _summarise(sweep, rows, model_dir, t0)
    return TuneResult(run_dir=sweep.run_dir, model_dir=model_dir, best=rows[0], trials=rows)


def tune(cfg: TuneConfig) -> TuneResult:
    """Run a whole sweep: data once, Tuner with ASHA, trials table and plot, best model export."""
    sweep = _prepare(cfg)
    ensure_ray()
    t0 = time.time()
    space, base = sweep.space, sweep.base
    log(f"sweep {cfg.name!r}: {sweep.n_trials} trial(s) of at most {cfg.epochs} epochs, "
        f"{cfg.max_concurrent_trials} at a time, searching {', '.join(space.names) or 'nothing'}; "
        f"base {cfg.train_config}, {base.image_size}px, {cfg.num_workers} worker(s) per trial on "
        f"{'GPU' if cfg.use_gpu else 'CPU'}")
    warn_relative_storage(cfg.storage)
    plan = resume_plan(sweep)
    _announce(sweep, plan)
    tracker = start_sweep(cfg, space)
    try:
        results, stats = _run(sweep, plan)
        result = _publish(sweep, plan, results, stats, t0, tracker)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return result


def main_entry(cfg: TuneConfig) -> int:
    """Entry point for jobs/tune.py: run, print expected errors as one line, return an exit code."""
    try:
        tune(cfg)
    except (ClusterError, ConfigError, DataError, ModelDirError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
