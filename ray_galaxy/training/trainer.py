"""The Ray Train driver: the datasets (:mod:`ray_galaxy.streaming`: streamed or cached), a
``TorchTrainer`` whose workers run :func:`~ray_galaxy.training.loop.train_loop_per_worker`, and the
export of the best checkpoint."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from ray.data import DataContext, ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_galaxy.checkpoint import METRICS_FILE, ModelDirError, load_model_dir
from ray_galaxy.config import TrainConfig
from ray_galaxy.console import fmt_seconds, log
from ray_galaxy.data import DataError
from ray_galaxy.generation.sampler import read_sampler
from ray_galaxy.labels import read_labels
from ray_galaxy.runtime import ClusterError, ensure_ray, ray_log_dir, storage_path, warn_relative_storage
from ray_galaxy.storage import exists, join, read_bytes, write_bytes
from ray_galaxy.streaming import DataStats, load_datasets
from ray_galaxy.tracking import Tracker, resolve_uri, ui_command
from ray_galaxy.training.export import export_model, fit_sampler_into
from ray_galaxy.training.loop import VAL_METRIC, train_loop_per_worker


@dataclass
class TrainResult:
    """What a finished run produced."""

    model_dir: str
    run_dir: str
    metrics: dict[str, Any]


# Ray Train's own INFO lines (worker group started, process group set up) stay in its log files.
TRAIN_LOG_LEVEL = "WARNING"


def _quiet(run_config: RunConfig) -> RunConfig:
    """``run_config`` with Ray Train's console output at :data:`TRAIN_LOG_LEVEL`, unless the
    caller chose a level other than Ray's default."""
    if run_config.logging_config.log_level != LoggingConfig().log_level:
        return run_config
    return dataclasses.replace(run_config, logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL))


def _ingest_config() -> DataConfig:
    """Ray Train's default ingest options, spelled out (its default copies the deprecated
    ``exclude_resources`` and so warns in every run), with rows delivered in order.

    Ray Data's parallel tasks finish in varying order; in order, the seeded file and block
    shuffles (:mod:`ray_galaxy.streaming`) and the seeded local shuffle buffer fix what a worker
    sees, so one worker on CPU repeats a run exactly. It costs little here: the decode tasks
    still run in parallel, and a finished block waits only for the ones before it."""
    options = DataContext.get_current().execution_options
    return DataConfig(execution_options=ExecutionOptions(
        resource_limits=options.resource_limits, preserve_order=True,
        verbose_progress=options.verbose_progress))


def make_trainer(cfg: TrainConfig, train_ds: Any, val_ds: Any, extra_loop_config: dict | None = None,
                 run_config: Any = None, name: str | None = None) -> TorchTrainer:
    """The ``TorchTrainer`` for ``cfg`` (Tune builds one per trial the same way, with its own
    ``run_config``); ``name``: Ray Train's run name (default ``cfg.name``)."""
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    # An elastic run (num_workers MIN-MAX) starts with what fits and is resized from its last
    # checkpoint; batch_size stays the global batch, so the optimisation does not change with it.
    scaling = ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                            resources_per_worker=resources, placement_strategy=cfg.placement_strategy,
                            elastic_resize_monitor_interval_s=cfg.elastic_check_s)
    if run_config is None:
        run_config = RunConfig(
            name=name or cfg.name,
            storage_path=storage_path(cfg.storage),
            # Train retries a worker group it cannot place (WorkerGroupStartupTimeoutError, a
            # controller error) without end unless controller_failure_limit bounds it.
            failure_config=FailureConfig(max_failures=cfg.max_failures,
                                         max_preemption_failures=cfg.max_preemptions,
                                         controller_failure_limit=cfg.placement_tries),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute=VAL_METRIC,
                                               checkpoint_score_order="min"),
        )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), **(extra_loop_config or {})},
        scaling_config=scaling,
        run_config=_quiet(run_config),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=_ingest_config(),
    )


def _header(cfg: TrainConfig) -> str:
    """What is trained, on what, and where it goes."""
    hardware = "GPU" if cfg.use_gpu else "CPU"
    return (f"training run {cfg.name!r}: data {cfg.data!r}, {cfg.image_size}px, preset {cfg.preset}, "
            f"latent {cfg.latent_dim}, likelihood {cfg.likelihood}, {cfg.epochs} epochs on "
            f"{cfg.workers_text()} {hardware} worker(s); checkpoints in {join(storage_path(cfg.storage), cfg.name)}")


def _data_lines(stats: DataStats) -> None:
    """What was read, and a few of the skipped files (when streaming: what the first epoch met)."""
    if not stats.complete:
        split = stats.files_per_split
        log(f"data: {split.get('train', 0)} train / {split.get('val', 0)} val files of {stats.files}; "
            "unreadable ones are skipped and counted as the first epoch reads them")
        return
    took = f" in {stats.seconds:.1f}s" if stats.cache == "on" else ", streamed"
    log(f"data: {stats.train_images} train / {stats.val_images} val images from {stats.files} files"
        f"{took}; skipped {stats.skipped} {stats.skipped_by_reason or ''}")
    for example in stats.skipped_examples[:5]:
        log(f"  skipped {example}")


def _fit(trainer: TorchTrainer, cfg: TrainConfig) -> tuple[Any, Any]:
    """Run the trainer: (best checkpoint, latest checkpoint)."""
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - give one clear line, keep the cause chained
        failure = getattr(e, "controller_failure", None)  # Train's ControllerError carries the cause
        if type(failure).__name__ == "WorkerGroupStartupTimeoutError":
            raise ClusterError(
                f"training run {cfg.name!r}: the cluster had no room for {cfg.min_workers} worker(s) of "
                f"{cfg.cpus_per_worker} CPU{' + 1 GPU' if cfg.use_gpu else ''} each in {cfg.placement_tries + 1} "
                f"tries (Train waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default, per try); lower "
                f"--num-workers or --cpus-per-worker, " + ("" if cfg.elastic else f"give a range (--num-workers "
                f"1-{cfg.max_workers}) to train with what there is, ") + "or add nodes") from e
        raise RuntimeError(f"training run {cfg.name!r} failed: {type(e).__name__}: {e}") from e
    best = result.get_best_checkpoint(metric=VAL_METRIC, mode="min") or result.checkpoint
    if best is None:
        raise RuntimeError(f"training run {cfg.name!r} produced no checkpoint")
    return best, result.checkpoint


def start_tracking(cfg: TrainConfig, job: str = "train") -> Tracker:
    """The MLflow run of a training job (params: the resolved config); disabled when tracking
    is off or the store cannot be reached."""
    tracker = Tracker.start(resolve_uri(cfg.tracking, cfg.tracking_uri, cfg.storage), cfg.experiment,
                            cfg.name, params=cfg.to_dict(), tags={"job": job})
    if tracker.enabled:
        log(f"tracking: MLflow run {tracker.run_id} in experiment {cfg.experiment!r}; "
            f"UI: {ui_command(str(tracker.uri))}")
    return tracker


TRACKED_FILES = ("samples.png", "traversal.png", METRICS_FILE)


def record_model(tracker: Tracker, model_dir: str) -> None:
    """Finish a model's run: the run id into the model directory's metrics.json (so later jobs
    find the run), the best epoch's numbers, the figures and metrics.json as artifacts, and where
    the model directory is."""
    if not tracker.enabled:
        return
    path = join(model_dir, METRICS_FILE)
    recorded = json.loads(read_bytes(path))
    recorded["tracking"] = tracker.spec()
    write_bytes(path, json.dumps(recorded, indent=1, default=str).encode())
    tracker.log_metrics({"best": recorded.get("best", {}), "best_epoch": recorded.get("best_epoch"),
                         "epochs_run": recorded.get("epochs_run")})
    tracker.set_tags({"model_dir": model_dir})
    tracker.log_files({name: read_bytes(join(model_dir, name))
                       for name in TRACKED_FILES if exists(join(model_dir, name))})


# With fine-tuning, the likelihood phase's model directory (and its sampler) is kept here, under
# the run's folder, and the fine-tuning phase's Ray Train run is named after the run plus this.
LIKELIHOOD_MODEL = "likelihood-model"
FINETUNE_RUN = "finetune"


def _finetune(cfg: TrainConfig, datasets: tuple[Any, Any], tracker: Tracker, start_dir: str,
              model_dir: str, stats: DataStats) -> dict[str, Any]:
    """The adversarial fine-tuning phase from the model directory ``start_dir``; its last epoch
    becomes ``model_dir`` (the critic's game has no validation loss to pick an epoch by), with a
    sampler whose codes come from ``start_dir``; its residual detail too with ``adv_detail`` (the
    critic judged images with it drawn on), else refitted to the new decoder."""
    log(f"fine-tuning the decoder for {cfg.finetune_epochs} epochs against a critic (encoder frozen; "
        f"the likelihood model stays in {start_dir})")
    loop = {"tracking": tracker.spec(), "finetune": start_dir}
    _, latest = _fit(make_trainer(cfg, *datasets, loop, name=f"{cfg.name}-{FINETUNE_RUN}"), cfg)
    metrics = export_model(latest, latest, model_dir, cfg, stats.to_dict())
    if cfg.fit_sampler:
        # The critic trained the decoder to look real with the detail drawn on it: the detail stays.
        fit_sampler_into(model_dir, cfg, codes_from=start_dir, keep_detail=cfg.adv_detail)
    return metrics


def _likelihood_done(model_dir: str, epochs: int) -> bool:
    """Whether ``model_dir`` is a finished likelihood phase of ``epochs`` epochs (a fine-tuning run
    started again: it goes on from there)."""
    try:
        return load_model_dir(model_dir).metrics.get("epochs_run") == epochs
    except ModelDirError:
        return False


def _has_sampler(model_dir: str) -> bool:
    """Whether ``model_dir`` has a sampler fitted to its model.pt."""
    try:
        md = load_model_dir(model_dir)
        return read_sampler(model_dir, md.sha256) is not None
    except ModelDirError:
        return False


def _likelihood_phase(cfg: TrainConfig, datasets: tuple[Any, Any], tracker: Tracker, stats: DataStats,
                      model_dir: str) -> dict[str, Any]:
    """Train on the likelihood alone; the best epoch becomes ``model_dir``, with its sampler when
    one is asked for (or when fine-tuning's critic needs its codes)."""
    if cfg.finetune_epochs and _likelihood_done(model_dir, cfg.epochs):
        log(f"likelihood phase: its {cfg.epochs} epochs are done ({model_dir}); fine-tuning goes on from there")
        metrics = load_model_dir(model_dir).metrics
        tracker.log_history(metrics.get("history", []))  # this job's run shows the whole history too
    else:
        best, latest = _fit(make_trainer(cfg, *datasets, {"tracking": tracker.spec()}), cfg)
        if not stats.complete:  # streamed: the first epoch has now met every file
            stats.finish()
            _data_lines(stats)
            stats.check()
        metrics = export_model(best, latest, model_dir, cfg, stats.to_dict())
    # The fine-tuning critic judges decodes of the sampler's codes, so it needs the sampler first.
    wanted = cfg.fit_sampler or (cfg.finetune_epochs and cfg.adv_sample_share > 0)
    if wanted and not (cfg.finetune_epochs and _has_sampler(model_dir)):
        fit_sampler_into(model_dir, cfg)
    return metrics


def _train(cfg: TrainConfig, tracker: Tracker, t0: float) -> TrainResult:
    train_ds, val_ds, stats = load_datasets(cfg.data, cfg.image_size, cfg.crop, cfg.val_fraction,
                                            cache=cfg.cache, seed=cfg.seed)
    _data_lines(stats)
    run_dir = join(storage_path(cfg.storage), cfg.name)
    model_dir = join(run_dir, "model")
    first_dir = join(run_dir, LIKELIHOOD_MODEL) if cfg.finetune_epochs else model_dir
    metrics = _likelihood_phase(cfg, (train_ds, val_ds), tracker, stats, first_dir)
    if cfg.finetune_epochs:
        metrics = _finetune(cfg, (train_ds, val_ds), tracker, first_dir, model_dir, stats)
    record_model(tracker, model_dir)
    b = metrics["best"]
    log(f"{'last' if cfg.finetune_epochs else 'best'} epoch {b['epoch']}: val loss {b[VAL_METRIC]:.1f}, "
        f"{b['val_bpd']:.3f} bits/dim, PSNR {b['val_psnr']:.2f} dB; total {fmt_seconds(time.time() - t0)}")
    log(f"model directory: {model_dir}")
    log(f"Ray's own logs: {ray_log_dir()}")
    return TrainResult(model_dir=model_dir, run_dir=run_dir, metrics=metrics)


def train(cfg: TrainConfig) -> TrainResult:
    """Run a whole training job: data, Ray Train, export, its MLflow run. Returns where the
    model went."""
    if cfg.labels:  # a bad CSV fails now, not after training when the sampler is fitted
        table = read_labels(cfg.labels)
        log(f"labels: {len(table.by_key)} images in {len(table.classes)} classes ({', '.join(table.classes)}) "
            f"from {cfg.labels}; the sampler is fitted per class after training")
    ensure_ray()
    t0 = time.time()
    log(_header(cfg))
    warn_relative_storage(cfg.storage)
    tracker = start_tracking(cfg)
    try:
        result = _train(cfg, tracker, t0)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return result


def main_entry(cfg: TrainConfig) -> int:
    """Entry point shared by jobs: run, print errors as one line, return an exit code."""
    try:
        train(cfg)
    except (ClusterError, DataError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
