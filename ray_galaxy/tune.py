"""Ray Tune: ASHA hyperparameter sweeps of the galaxy VAE, one Ray Train run per trial.

The driver (:func:`tune`) reads and decodes the data once, then runs a Tuner whose trials are
function trainables (:func:`run_trial`). Each trial builds and fits one ``TorchTrainer`` (the
same one ``jobs/train.py`` uses) and forwards every per-epoch Train report to Tune with a
``TuneReportCallback``, so ASHA can stop poor trials early. Ray 2.60 runs Train V2, where
``Tuner(trainer)`` no longer works; this is the pattern that replaces it.

Afterwards the driver writes, under ``<storage>/<name>/``:

    trials.csv / trials.md   every trial: hyperparameters, best/final val_bpd, epochs, early stop
    trials.png               best val_bpd against each searched hyperparameter
    model/                   the best trial's best checkpoint as a model directory
    trials/<trial_id>/       each trial's Ray Train run (checkpoints)
    sweep.json               the settings the sweep started with, and the data counts

Running the same sweep (same name and storage) again resumes it if it was interrupted
(Tune's ``Tuner.restore``), or, if every trial ended, publishes its results again.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_type_hints

from ray_galaxy.config import ConfigError, TrainConfig, _coerce, _h, field_names, from_mapping, train_config

# bits/dim of the kl_weight=1 negative ELBO: unlike val_loss it does not depend on the
# kl_weight being searched, so trials with different weights are compared on one scale.
TUNE_METRIC = "val_bpd"
TUNE_MODE = "min"

# Distribution name -> what its arguments are (shown in errors and --help).
DISTRIBUTIONS: dict[str, str] = {
    "choice": "a list of values, one sampled per trial",
    "grid": "a list of values, every one tried (num_samples times each)",
    "uniform": "[low, high]",
    "loguniform": "[low, high], low > 0",
    "quniform": "[low, high, q]",
    "qloguniform": "[low, high, q], low > 0",
    "randint": "[low, high): integers, high excluded",
    "lograndint": "[low, high): integers sampled on a log scale, high excluded, low >= 1",
}
_CATEGORICAL = ("choice", "grid")
_INT_DISTRIBUTIONS = ("randint", "lograndint")
_LOG_DISTRIBUTIONS = ("loguniform", "qloguniform", "lograndint")

# TrainConfig fields that are the same for every trial of a sweep, so not searchable: the
# sweep sets them (TuneConfig), or, for preset, they were applied with the base config.
SWEEP_FIELDS = ("data", "storage", "name", "epochs", "num_workers", "use_gpu", "cpus_per_worker",
                "preset")

DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "latent_dim": {"choice": [16, 32, 64, 128]},
    "lr": {"loguniform": [3e-4, 3e-3]},
    "kl_weight": {"loguniform": [0.05, 2.0]},
}

REPO = Path(__file__).resolve().parent.parent


def _log(msg: str) -> None:
    sys.stdout.write(f"[ray-galaxy] {msg}\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- configuration


@dataclass
class TuneConfig:
    """Settings of one hyperparameter sweep (``jobs/tune.py``, ``cluster/tune.yaml``)."""

    train_config: str = _h("Base training YAML every trial starts from (relative paths: the "
                           "working directory, then the repository).", default="cluster/train.yaml")
    data: str = _h("Training images, as for jobs/train.py; read and decoded once, shared by all trials.",
                   default="hubble-xdf")
    storage: str = _h("Where the sweep goes (path or URI): <storage>/<name>/.", default="./runs")
    name: str = _h("Sweep name; trials.csv, trials.md, trials.png and model/ go to <storage>/<name>/.",
                   default="galaxy-sweep")
    num_samples: int = _h("Trials to sample from the search space (times each grid value).", default=8)
    epochs: int = _h("Epochs of a trial that is never stopped early (ASHA's max_t).", default=30)
    max_concurrent_trials: int = _h("Trials running at once (each is a Ray Train run).", default=2)
    num_workers: int = _h("Ray Train workers per trial.", default=1)
    cpus_per_worker: float = _h("Logical CPUs per Train worker; fractional leaves CPU for Ray Data.",
                                default=0.5)
    use_gpu: bool = _h("Train each worker on one GPU (bf16).", default=False)
    trial_cpus: float = _h("Logical CPUs of each trial's own actor, which only drives its Train run; "
                           "tiny so it never starves Train workers or Ray Data.", default=0.01)
    grace_period: int = _h("ASHA: epochs every trial runs before it may be stopped.", default=5)
    reduction_factor: float = _h("ASHA: keep the best 1/reduction_factor of trials at each rung.",
                                 default=2.0)
    image_size: int = _h("Training resolution for every trial (0: the base config's).", default=0)
    batch_size: int = _h("Global batch size for every trial (0: the base config's).", default=0)
    channels: tuple[int, ...] = _h("Channels per stage for every trial (empty: the base config's).",
                                   default=())
    search_space: dict[str, Any] = _h(
        "TrainConfig fields to search, each {distribution: args} with distribution one of "
        + ", ".join(DISTRIBUTIONS) + "; a plain value fixes the field. Set it in the YAML file.",
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_SEARCH_SPACE.items()})
    seed: int = _h("Seed of the search-space sampling (training seeds come from the base config).",
                   default=0)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        for key in ("num_samples", "epochs", "max_concurrent_trials", "num_workers", "grace_period"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.grace_period > self.epochs:
            raise ConfigError(f"grace_period ({self.grace_period}) must not exceed epochs ({self.epochs})")
        if self.reduction_factor <= 1:
            raise ConfigError(f"reduction_factor must be > 1, got {self.reduction_factor}")
        if self.cpus_per_worker <= 0 or self.trial_cpus <= 0:
            # Tune cannot place an actor that requests nothing at all, hence > 0, not >= 0.
            raise ConfigError("cpus_per_worker and trial_cpus must be > 0")
        if self.image_size < 0 or self.batch_size < 0:
            raise ConfigError("image_size and batch_size must be >= 0 (0: the base config's)")
        parse_search_space(self.search_space)  # structure, names and value types

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig field: its distribution and the distribution's arguments."""

    name: str
    distribution: str
    args: tuple[Any, ...]

    @property
    def categorical(self) -> bool:
        return self.distribution in _CATEGORICAL

    @property
    def log_scale(self) -> bool:
        return self.distribution in _LOG_DISTRIBUTIONS

    def candidates(self) -> list[Any]:
        """Values that bound what can be sampled: every choice, or a range's end points."""
        if self.categorical:
            return list(self.args)
        low, high = self.args[0], self.args[1]
        return [low, high - 1 if self.distribution in _INT_DISTRIBUTIONS else high]

    def domain(self) -> Any:
        """The Ray Tune search domain."""
        from ray import tune as raytune

        values = [list(v) if isinstance(v, tuple) else v for v in self.args]
        if self.distribution == "grid":
            return raytune.grid_search(values)
        if self.distribution == "choice":
            return raytune.choice(values)
        return getattr(raytune, self.distribution)(*values)


@dataclass(frozen=True)
class SearchSpace:
    """A parsed ``search_space``: searched parameters and fixed values."""

    params: tuple[Param, ...]
    fixed: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def to_spec(self) -> dict[str, Any]:
        """The space in the YAML form, values converted to their types (for config.json)."""
        plain = {p.name: {p.distribution: [list(v) if isinstance(v, tuple) else v for v in p.args]}
                 for p in self.params}
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in self.fixed.items()}, **plain}

    def num_trials(self, num_samples: int) -> int:
        """Trials a sweep runs: Tune repeats the whole grid num_samples times."""
        return num_samples * math.prod(len(p.args) for p in self.params if p.distribution == "grid")

    def param_space(self) -> dict[str, Any]:
        """The Tuner's ``param_space``: one flat key per TrainConfig field."""
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in self.fixed.items()},
                **{p.name: p.domain() for p in self.params}}


def parse_search_space(spec: Mapping[str, Any]) -> SearchSpace:
    """Check and parse a ``search_space`` mapping; any mistake is a :class:`ConfigError` naming it.

    ``{field: {distribution: args}}`` searches a TrainConfig field; ``{field: value}`` fixes it
    for every trial. Values are converted to the field's type (YAML reads ``3e-4`` as text).
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"search_space must be a mapping of TrainConfig fields, got {spec!r}")
    valid = [f for f in field_names(TrainConfig) if f not in SWEEP_FIELDS]
    hints = get_type_hints(TrainConfig)
    params, fixed = [], {}
    for name, value in spec.items():
        if name in SWEEP_FIELDS:
            raise ConfigError(f"search_space: {name!r} is set by the sweep for every trial, not "
                              f"searched; searchable fields are: {', '.join(valid)}")
        if name not in valid:
            raise ConfigError(f"search_space: unknown TrainConfig field {name!r}; "
                              f"valid fields are: {', '.join(valid)}")
        typ = hints[name]
        is_tuple = getattr(typ, "__origin__", None) is tuple
        if not isinstance(value, Mapping):
            if isinstance(value, (list, tuple)) and not is_tuple:
                raise ConfigError(f"search_space: {name}: a list fixes nothing here; to search "
                                  f"these values write {{choice: {list(value)}}}")
            fixed[name] = _coerce(f"search_space: {name}", typ, value)
            continue
        if len(value) != 1:
            raise ConfigError(f"search_space: {name}: expected one {{distribution: args}}, got {dict(value)}")
        ((dist, args),) = value.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"search_space: unknown distribution {dist!r} for {name!r}; valid ones "
                              f"are: {', '.join(DISTRIBUTIONS)}")
        params.append(_parse_param(name, dist, args, typ))
    return SearchSpace(params=tuple(params), fixed=fixed)


def _parse_param(name: str, dist: str, args: Any, typ: Any) -> Param:
    where = f"search_space: {name}: {dist}"
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"{where} needs {DISTRIBUTIONS[dist]}, got {args!r}")
    if dist in _CATEGORICAL:
        return Param(name, dist, tuple(_coerce(where, typ, v) for v in args))
    if typ not in (int, float):
        raise ConfigError(f"{where}: {name} is not numeric; use choice or grid")
    if typ is int and dist not in _INT_DISTRIBUTIONS:
        raise ConfigError(f"{where}: {name} is an integer; use choice, grid, randint or lograndint")
    want = 3 if dist.startswith("q") else 2
    if len(args) != want:
        raise ConfigError(f"{where} needs {DISTRIBUTIONS[dist]}, got {list(args)}")
    num = int if dist in _INT_DISTRIBUTIONS else float
    values = tuple(_coerce(where, num, v) for v in args)
    low, high = values[0], values[1]
    if not low < high:
        raise ConfigError(f"{where}: low must be below high, got {list(values)}")
    if dist in _LOG_DISTRIBUTIONS and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
    if want == 3 and values[2] <= 0:
        raise ConfigError(f"{where}: q must be > 0, got {values[2]}")
    return Param(name, dist, values)


def _find_file(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.is_file() and (REPO / p).is_file():
        return REPO / p  # `ray job submit` from elsewhere, or a test's temporary working directory
    return p


def base_train_config(cfg: TuneConfig) -> TrainConfig:
    """The TrainConfig every trial starts from: the base YAML plus the sweep's own settings."""
    overrides: dict[str, Any] = {
        "data": cfg.data, "storage": trials_storage(cfg), "name": cfg.name, "epochs": cfg.epochs,
        "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu, "cpus_per_worker": cfg.cpus_per_worker,
    }
    if cfg.image_size:
        overrides["image_size"] = cfg.image_size
    if cfg.batch_size:
        overrides["batch_size"] = cfg.batch_size
    if cfg.channels:
        overrides["channels"] = cfg.channels
    return train_config(_find_file(cfg.train_config), **overrides)


def trial_train_config(base: TrainConfig | Mapping[str, Any], params: Mapping[str, Any],
                       name: str | None = None) -> TrainConfig:
    """The resolved TrainConfig of one trial: ``base`` with the trial's sampled ``params``."""
    values = dict(base.to_dict() if isinstance(base, TrainConfig) else base)
    values.update(params)
    if name is not None:
        values["name"] = name
    return from_mapping(TrainConfig, values, source="trial config")


def check_search_space(space: SearchSpace, base: TrainConfig) -> None:
    """Raise a :class:`ConfigError` if some value the sweep could sample is invalid with ``base``.

    Caught here rather than as a failed trial minutes into the sweep.
    """
    try:
        trial_train_config(base, space.fixed)
    except ConfigError as e:
        raise ConfigError(f"search_space: fixed values {space.fixed} are invalid: {e}") from None
    for p in space.params:
        for v in p.candidates():
            try:
                trial_train_config(base, {**space.fixed, p.name: v})
            except ConfigError as e:
                raise ConfigError(f"search_space: {p.name}={v!r} ({p.distribution}) is invalid "
                                  f"with the base config: {e}") from None


def trials_storage(cfg: TuneConfig) -> str:
    """Where the trials' Ray Train runs go: ``<storage>/<name>/trials``."""
    from ray_galaxy.checkpoint import join
    from ray_galaxy.train import storage_path

    return join(storage_path(cfg.storage), cfg.name, "trials")


# --------------------------------------------------------------------------- trial side


def _report_callback() -> Any:
    """A TuneReportCallback that puts the metrics people read first.

    Tune's trial table shows the first four numeric metrics of a result; the training loop
    reports train_* first, so without reordering the table would hide val_bpd.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    first = ("epoch", TUNE_METRIC, "val_psnr", "epoch_seconds")

    class _Callback(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            ordered = [{**{k: m[k] for k in first if k in m}, **m} for m in metrics]
            super().after_report(run_context, ordered, checkpoint)

    return _Callback()


def run_trial(config: dict[str, Any], *, base: dict[str, Any], train_ds: Any, val_ds: Any,
              storage: str) -> None:
    """One Tune trial: fit one Ray Train run of ``base`` with the sampled ``config``.

    Runs inside the trial's (nearly resource-free) actor, which only drives the Train
    controller; the work happens in the Train workers.
    """
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from ray_galaxy.train import make_trainer

    # The trial id names the Train run: unique across sweeps, so a trial never resumes another
    # trial's (or an earlier sweep's) checkpoints, while Train's own restarts after a worker
    # failure (max_failures) still resume this run's.
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_train_config(base, config, name=trial_id)
    run_config = RunConfig(
        name=trial_id,
        storage_path=storage,
        callbacks=[_report_callback()],
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        # Score checkpoints by the sweep's metric, so the kept "best" is the one exported.
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                           checkpoint_score_attribute=TUNE_METRIC,
                                           checkpoint_score_order=TUNE_MODE),
    )
    make_trainer(cfg, train_ds, val_ds, run_config=run_config).fit()


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _trial_dirname(trial: Any) -> str:
    # Short and equal to the Train run's name; the default embeds every parameter value.
    return trial.trial_id


# --------------------------------------------------------------------------- driver side


@dataclass
class TuneResult:
    """What a finished sweep produced."""

    run_dir: str
    model_dir: str
    best: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _trial_states(results: Any) -> list[tuple[str, str]]:
    """(trial_id, Tune status) per result. A Result lacks both; the grid's analysis has them."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    if len(trials) == len(results):
        return [(str(t.trial_id), str(t.status)) for t in trials]
    # Fallback (private attribute gone): ids from the trial directories, named by trial id.
    return [(str(r.path).rstrip("/").rsplit("/", 1)[-1], "TERMINATED") for r in results]


def trial_rows(results: Any, space: SearchSpace, epochs: int,
               saved_status: Mapping[str, str] | None = None,
               histories: Mapping[str, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """One row per trial of a Tune ResultGrid, best first (by best val_bpd).

    status: completed (ran all epochs), stopped (by ASHA), error, or interrupted (the sweep
    ended, e.g. by Ctrl-C, while the trial was pending or running). ``saved_status`` (trial
    id -> Tune status in the saved experiment state) takes precedence: after Ctrl-C, Tune
    saves the state and then marks the trials it ends TERMINATED in what ``fit`` returns.
    ``histories`` (trial id -> :func:`train_history`) add the epochs Tune's own results lack:
    a trial resumed without a Tune checkpoint restarts its Tune results, and epochs its Train
    run finished just before an interruption were never reported to Tune.
    """
    rows = []
    for r, (trial_id, tune_status) in zip(results, _trial_states(results)):
        tune_status = (saved_status or {}).get(trial_id, tune_status)
        df = r.metrics_dataframe
        row: dict[str, Any] = {"trial_id": trial_id}
        row.update({p: (r.config or {}).get(p) for p in space.names})
        best = final = best_epoch = psnr = None
        epochs_run = 0
        per_epoch: dict[int, tuple[float | None, float | None]] = {}  # epoch -> (val_bpd, val_psnr)
        if df is not None and len(df) and TUNE_METRIC in df.columns:
            ep = [int(v) for v in df["epoch"]] if "epoch" in df.columns else list(range(1, len(df) + 1))
            ps = df["val_psnr"] if "val_psnr" in df.columns else [None] * len(df)
            per_epoch.update({e: (_finite(b), _finite(q)) for e, b, q in zip(ep, df[TUNE_METRIC], ps)})
        for h in (histories or {}).get(trial_id, []):
            if "epoch" in h:
                per_epoch[int(h["epoch"])] = (_finite(h.get(TUNE_METRIC)), _finite(h.get("val_psnr")))
        if per_epoch:
            epochs_run = max(per_epoch)
            final, psnr = per_epoch[epochs_run]
            good = [(v, e) for e, (v, _) in sorted(per_epoch.items()) if v is not None]
            if good:
                best, best_epoch = min(good)
        error = r.error
        if error is not None or tune_status == "ERROR":
            status = "error"
        elif tune_status != "TERMINATED":
            status = "interrupted"
        else:
            status = "stopped" if epochs_run < epochs else "completed"
        row.update({
            "best_val_bpd": best, "best_epoch": best_epoch, "final_val_bpd": final,
            "final_val_psnr": psnr, "epochs_run": epochs_run,
            "stopped_early": "yes" if status == "stopped" else "no",
            "status": status,
            "error": "" if error is None else f"{type(error).__name__}: {error}".splitlines()[0][:200],
        })
        rows.append(row)
    rows.sort(key=lambda r: (r["best_val_bpd"] is None, r["best_val_bpd"] or 0.0, r["trial_id"]))
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def rows_csv(rows: list[dict[str, Any]]) -> bytes:
    """trials.csv: full precision, one row per trial."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else ",".join(map(str, v)) if isinstance(v, (list, tuple))
                            else v) for k, v in r.items()})
    return buf.getvalue().encode()


def rows_markdown(rows: list[dict[str, Any]], cfg: TuneConfig, space: SearchSpace,
                  model_dir: str) -> bytes:
    """trials.md: the same table for people, with the sweep's settings above it."""
    cols = [c for c in (rows[0] if rows else {}) if c != "error" or any(r["error"] for r in rows)]
    lines = [
        f"# Sweep `{cfg.name}`",
        "",
        f"{len(rows)} trials; metric `{TUNE_METRIC}` (bits/dim of the kl_weight=1 negative ELBO on "
        f"the validation split, lower is better); ASHA on `epoch` with grace period "
        f"{cfg.grace_period}, reduction factor {cfg.reduction_factor:g}, at most {cfg.epochs} epochs.",
        "",
        "Searched: " + ", ".join(f"`{p.name}` {p.distribution} {list(p.args)}" for p in space.params),
    ]
    if space.fixed:
        lines.append("Fixed: " + ", ".join(f"`{k}`={_fmt(v)}" for k, v in space.fixed.items()))
    if rows and rows[0]["best_val_bpd"] is not None:
        lines.append(f"Best: `{rows[0]['trial_id']}` (first row), exported to `{model_dir}`.")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]).replace("|", "/") for c in cols) + " |")
    return ("\n".join(lines) + "\n").encode()


def _train_result(train_run: str) -> Any:
    """The ``ray.train.Result`` of a finished or interrupted Train run, read from storage."""
    import ray.train

    # Restoring a Result logs, at INFO, advice about starting a new run; nothing is started.
    train_logger = logging.getLogger("ray.train")
    level = train_logger.level
    train_logger.setLevel(logging.WARNING)
    try:
        return ray.train.Result.from_path(train_run)
    finally:
        train_logger.setLevel(level)


def train_history(train_run: str) -> list[dict[str, Any]]:
    """Per-epoch metrics of a trial's Train run, from its latest checkpoint (``[]`` if none).

    Every epoch's report carries a checkpoint whose ``state.json`` holds the whole history, so
    this is complete up to the last epoch the run finished, whatever Tune recorded.
    """
    from ray_galaxy.checkpoint import STATE_FILE, join, read_bytes

    try:
        latest = _train_result(train_run).checkpoint
        if latest is None:
            return []
        state = json.loads(read_bytes(join(train_run, latest.path.rstrip("/").rsplit("/", 1)[-1],
                                           STATE_FILE)))
    except Exception:  # no run (trial never started), or no readable checkpoint
        return []
    return list(state.get("history") or [])


def export_best(cfg: TuneConfig, base: TrainConfig, best: dict[str, Any], space: SearchSpace,
                results_params: dict[str, Any], n_trials: int, data_stats: dict[str, Any],
                run_dir: str) -> str:
    """Export the best trial's best checkpoint as ``<run_dir>/model``; returns its URI."""
    from ray_galaxy.checkpoint import join
    from ray_galaxy.train import export_model

    trial_id = best["trial_id"]
    train_run = join(trials_storage(cfg), trial_id)
    result = _train_result(train_run)
    checkpoint = result.get_best_checkpoint(metric=TUNE_METRIC, mode=TUNE_MODE) or result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"best trial {trial_id} left no checkpoint in {train_run}")
    trial_cfg = trial_train_config(base, results_params, name=trial_id)
    model_dir = join(run_dir, "model")
    extra = {"tune": {
        "sweep": cfg.name, "trial_id": trial_id, "train_run": train_run,
        "metric": TUNE_METRIC, "mode": TUNE_MODE, "best_val_bpd": best["best_val_bpd"],
        "best_epoch": best["best_epoch"], "params": {p: results_params.get(p) for p in space.names},
        "trials": n_trials, "config": {**cfg.to_dict(), "search_space": space.to_spec()},
        "scheduler": {"type": "ASHA", "time_attr": "epoch", "grace_period": cfg.grace_period,
                      "reduction_factor": cfg.reduction_factor, "max_t": cfg.epochs},
    }}
    export_model(checkpoint, result.checkpoint, model_dir, trial_cfg, data_stats, extra_config=extra)
    if trial_cfg.fit_sampler:
        from ray_galaxy.train import fit_sampler_into

        fit_sampler_into(model_dir, trial_cfg)
    return model_dir


SWEEP_FILE = "sweep.json"


def sweep_settings(cfg: TuneConfig, space: SearchSpace, base: TrainConfig) -> dict[str, Any]:
    """What a rerun must repeat to resume a sweep: the sweep config and the resolved base
    training config (storage and name locate the sweep, so they are left out)."""
    where = ("storage", "name")
    sweep = {k: v for k, v in cfg.to_dict().items() if k not in where}
    sweep["search_space"] = space.to_spec()
    train = {k: v for k, v in base.to_dict().items() if k not in where and k not in sweep}
    return json.loads(json.dumps({"sweep": sweep, "train": train}))


def settings_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs between two :func:`sweep_settings`."""
    out = []
    for part in ("sweep", "train"):
        a, b = old.get(part) or {}, new.get(part) or {}
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<unset>") != b.get(k, "<unset>"):
                out.append(f"{'' if part == 'sweep' else 'train.'}{k}: {a.get(k, '<unset>')!r} -> "
                           f"{b.get(k, '<unset>')!r}")
    return out


def _read_sweep_file(run_dir: str) -> dict[str, Any] | None:
    from ray_galaxy.checkpoint import exists, join, read_bytes

    path = join(run_dir, SWEEP_FILE)
    return json.loads(read_bytes(path)) if exists(path) else None


def _saved_trials(run_dir: str) -> Any:
    """Tune's saved state of the sweep in ``run_dir`` (an ExperimentAnalysis), or None if no
    trial state was saved yet."""
    from ray.tune import ExperimentAnalysis

    try:
        return ExperimentAnalysis(run_dir, default_metric=TUNE_METRIC, default_mode=TUNE_MODE)
    except (FileNotFoundError, ValueError, RuntimeError):
        return None


def _resume_plan(cfg: TuneConfig, run_dir: str, settings: dict[str, Any],
                 n_trials: int) -> tuple[str, Any, dict[str, Any] | None]:
    """Decide what a run of the sweep in ``run_dir`` does: ``("new", None, None)``,
    ``("resume", analysis, saved)`` or ``("finished", analysis, saved)``.

    Raises a :class:`ConfigError` if the saved sweep was started with other settings.
    """
    import ray.tune

    if not ray.tune.Tuner.can_restore(run_dir):
        return "new", None, None
    saved = _read_sweep_file(run_dir)
    if saved is None:
        _log(f"{run_dir} holds a sweep without {SWEEP_FILE} (started by an older version); "
             "its settings cannot be checked against these")
    else:
        diffs = settings_differences(saved.get("settings") or {}, settings)
        if diffs:
            raise ConfigError(
                f"sweep {cfg.name!r} in {run_dir} was started with other settings ("
                + "; ".join(diffs) + "); rerun with the settings it started with to resume it, "
                "or choose a new --name for a new sweep")
    analysis = _saved_trials(run_dir)
    if analysis is None:
        _log(f"{run_dir}: the sweep was stopped before Tune saved any trial; starting it anew")
        return "new", None, None
    trials = list(analysis.trials or [])
    if len(trials) >= n_trials and all(str(t.status) == "TERMINATED" for t in trials):
        return "finished", analysis, saved
    return "resume", analysis, saved


def tune(cfg: TuneConfig) -> TuneResult:
    """Run a whole sweep: data once, Tuner with ASHA, trials table and plot, best model export."""
    import numpy as np
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ray_galaxy.checkpoint import join, write_bytes
    from ray_galaxy.data import load_datasets
    from ray_galaxy.figures import png_bytes
    from ray_galaxy.train import ensure_ray, fmt_seconds, storage_path

    space = parse_search_space(cfg.search_space)
    base = base_train_config(cfg)
    check_search_space(space, base)
    ensure_ray()
    t0 = time.time()
    run_dir = join(storage_path(cfg.storage), cfg.name)
    _log(f"sweep {cfg.name!r}: {space.num_trials(cfg.num_samples)} trial(s) of at most {cfg.epochs} epochs, "
         f"{cfg.max_concurrent_trials} at a time, searching {', '.join(space.names) or 'nothing'}; "
         f"base {cfg.train_config}, {base.image_size}px, {cfg.num_workers} worker(s) per trial on "
         f"{'GPU' if cfg.use_gpu else 'CPU'}")
    n_trials = space.num_trials(cfg.num_samples)
    settings = sweep_settings(cfg, space, base)
    plan, analysis, saved = _resume_plan(cfg, run_dir, settings, n_trials)
    previous = list(getattr(analysis, "trials", None) or [])
    if plan == "finished":
        _log(f"sweep {cfg.name!r} already finished ({len(previous)} trials) in {run_dir}: nothing to "
             "run; publishing its results again (choose a new --name for a new sweep)")
    elif plan == "resume":
        counts = {s: sum(str(t.status) == s for t in previous) for s in ("TERMINATED", "ERROR")}
        unfinished = len(previous) - counts["TERMINATED"] - counts["ERROR"]
        _log(f"resuming the interrupted sweep {cfg.name!r} in {run_dir}: {counts['TERMINATED']} of "
             f"{n_trials} trials ended; {unfinished} unfinished and {counts['ERROR']} failed continue "
             f"from their last checkpoints; {max(0, n_trials - len(previous))} not started yet")
    else:
        _log(f"starting a new sweep {cfg.name!r} in {run_dir}")

    stats_dict = (saved or {}).get("data") if plan == "finished" else None
    if stats_dict is None:
        train_ds, val_ds, stats = load_datasets(base.data, base.image_size, base.crop, base.val_fraction)
        _log(f"data: {stats.train_images} train / {stats.val_images} val images from {stats.files} files "
             f"in {stats.seconds:.1f}s; skipped {stats.skipped} {stats.skipped_by_reason or ''}")
        stats_dict = stats.to_dict()
        if plan != "finished":
            # Before the Tuner starts: a sweep that can be restored always has its settings.
            write_bytes(join(run_dir, SWEEP_FILE), json.dumps(
                {"format": 1, "settings": settings, "data": stats_dict}, indent=1).encode())

    if plan == "finished":
        results = ray.tune.ResultGrid(analysis)
    else:
        # with_parameters puts the datasets in the object store once for all trials.
        trainable = ray.tune.with_parameters(run_trial, base=base.to_dict(), train_ds=train_ds,
                                             val_ds=val_ds, storage=trials_storage(cfg))
        trainable = ray.tune.with_resources(
            trainable, ray.tune.PlacementGroupFactory([{"CPU": cfg.trial_cpus}]))
        if plan == "resume":
            # Unfinished and failed trials continue under their trial ids, so each one's Ray
            # Train run resumes from its latest checkpoint; trials not created yet are sampled
            # by the restored search algorithm.
            tuner = ray.tune.Tuner.restore(run_dir, trainable=trainable, resume_errored=True)
        else:
            tuner = ray.tune.Tuner(
                trainable,
                param_space=space.param_space(),
                tune_config=ray.tune.TuneConfig(
                    metric=TUNE_METRIC, mode=TUNE_MODE, num_samples=cfg.num_samples,
                    scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.epochs,
                                            grace_period=cfg.grace_period,
                                            reduction_factor=cfg.reduction_factor),
                    # The concurrency limit goes on the generator itself: Tune ignores (with only
                    # a log line) TuneConfig.max_concurrent_trials once a BasicVariantGenerator
                    # is passed.
                    search_alg=BasicVariantGenerator(max_concurrent=cfg.max_concurrent_trials,
                                                     random_state=cfg.seed),
                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname),
                run_config=ray.tune.RunConfig(name=cfg.name, storage_path=storage_path(cfg.storage)),
            )
        results = tuner.fit()

    saved_now = _saved_trials(run_dir) if plan != "finished" else None
    rows = trial_rows(results, space, cfg.epochs,
                      {str(t.trial_id): str(t.status) for t in getattr(saved_now, "trials", None) or []},
                      {tid: train_history(join(trials_storage(cfg), tid)) for tid, _ in _trial_states(results)})
    params_by_trial = {tid: dict(r.config or {}) for r, (tid, _) in zip(results, _trial_states(results))}
    model_dir = join(run_dir, "model")
    write_bytes(join(run_dir, "trials.csv"), rows_csv(rows))
    write_bytes(join(run_dir, "trials.md"), rows_markdown(rows, cfg, space, model_dir))
    write_bytes(join(run_dir, "trials.png"), png_bytes(np.asarray(plot_trials(rows, space))))
    _log(f"trials table: {join(run_dir, 'trials.md')} (and trials.csv, trials.png)")
    if not rows or rows[0]["best_val_bpd"] is None:
        errors = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"])[:2000]
        raise RuntimeError(f"sweep {cfg.name!r}: no trial reported {TUNE_METRIC} ({errors or 'no trials'})")
    best = rows[0]
    export_best(cfg, base, best, space, params_by_trial[best["trial_id"]], len(rows), stats_dict, run_dir)
    n = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "error", "interrupted")}
    interrupted = f", {n['interrupted']} interrupted" if n["interrupted"] else ""
    _log(f"{len(rows)} trials: {n['completed']} completed, {n['stopped']} stopped early by ASHA, "
         f"{n['error']} failed{interrupted}; total {fmt_seconds(time.time() - t0)}")
    if n["interrupted"] or len(rows) < n_trials:
        _log(f"the sweep is unfinished ({len(rows)} of {n_trials} trials created, {n['interrupted']} "
             "interrupted): run the same command again to resume it")
    _log(f"best trial {best['trial_id']}: {TUNE_METRIC} {best['best_val_bpd']:.4f} at epoch "
         f"{best['best_epoch']} (" + ", ".join(f"{p}={_fmt(best[p])}" for p in space.names) + ")")
    _log(f"model directory: {model_dir}")
    return TuneResult(run_dir=run_dir, model_dir=model_dir, best=best, trials=rows)


# --------------------------------------------------------------------------- plot (Pillow only)


def _ticks(lo: float, hi: float, log: bool, n: int = 4) -> list[float]:
    if log:
        a, b = math.log10(lo), math.log10(hi)
        return [10 ** (a + (b - a) * i / (n - 1)) for i in range(n)]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def plot_trials(rows: list[dict[str, Any]], space: SearchSpace) -> "Image.Image":
    """Scatter panels of best val_bpd against each searched hyperparameter (Pillow and numpy only).

    Filled dots ran to the end, hollow ones were stopped early by ASHA; the best trial is red.
    """
    from PIL import Image, ImageDraw, ImageFont

    params = list(space.params) or [Param("trial", "choice", tuple(r["trial_id"] for r in rows))]
    pw, ph, ml, mr, mt, mb = 340, 280, 62, 16, 34, 46
    W, H = pw * len(params), ph + 28
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    pts = [r for r in rows if r["best_val_bpd"] is not None]
    legend = ("best val_bpd (bits/dim, lower is better) per trial:  filled = ran to the end, "
              "hollow = stopped early by ASHA, red = best")
    d.text((8, 6), legend, fill="black", font=font)
    ys = [r["best_val_bpd"] for r in pts]
    ylo, yhi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = (yhi - ylo) * 0.08 or abs(yhi) * 0.05 or 1.0
    ylo, yhi = ylo - pad, yhi + pad
    best_id = rows[0]["trial_id"] if pts else None
    for i, p in enumerate(params):
        x0, y0 = i * pw + ml, 28 + mt
        x1, y1 = (i + 1) * pw - mr, 28 + ph - mb
        d.rectangle((x0, y0, x1, y1), outline="black")
        d.text(((x0 + x1) // 2, 28 + 8), p.name, fill="black", font=font, anchor="mt")

        def ypix(v: float) -> float:
            return y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)

        for t in _ticks(ylo + pad, yhi - pad, False, 4) if len(set(ys)) > 1 else [ylo + pad]:
            y = ypix(t)
            d.line((x0 - 4, y, x0, y), fill="black")
            d.text((x0 - 6, y), f"{t:.4g}", fill="black", font=font, anchor="rm")
        if p.categorical:
            cats = [_fmt(v) for v in p.args]
            pos = {c: x0 + (x1 - x0) * (k + 0.5) / len(cats) for k, c in enumerate(cats)}
            xticks = [(pos[c], c) for c in cats]

            def xpix(v: Any) -> float | None:
                return pos.get(_fmt(v))
        else:
            lo, hi = float(p.args[0]), float(p.args[1])

            def xpix(v: Any, lo: float = lo, hi: float = hi, log: bool = p.log_scale) -> float | None:
                if v is None:
                    return None
                f = (math.log(v / lo) / math.log(hi / lo)) if log else (float(v) - lo) / (hi - lo)
                return x0 + 8 + min(max(f, 0.0), 1.0) * (x1 - x0 - 16)

            xticks = [(xpix(t), f"{t:.3g}") for t in _ticks(lo, hi, p.log_scale)]
        for x, label in xticks:
            d.line((x, y1, x, y1 + 4), fill="black")
            d.text((x, y1 + 6), label, fill="black", font=font, anchor="mt")
        d.text(((x0 + x1) // 2, y1 + 24), p.name + (" (log scale)" if p.log_scale else ""),
               fill="gray", font=font, anchor="mt")
        for r in sorted(pts, key=lambda r: r["trial_id"] == best_id):  # best drawn last, on top
            x = xpix(r.get(p.name) if space.params else r["trial_id"])
            if x is None:
                continue
            y = ypix(r["best_val_bpd"])
            colour = (214, 39, 40) if r["trial_id"] == best_id else (31, 119, 180)
            box = (x - 5, y - 5, x + 5, y + 5)
            if r["stopped_early"] == "yes":
                d.ellipse(box, outline=colour, width=2)
            else:
                d.ellipse(box, fill=colour, outline=colour)
    return img


# --------------------------------------------------------------------------- entry point


def main_entry(cfg: TuneConfig) -> int:
    """Entry point for jobs/tune.py: run, print expected errors as one line, return an exit code."""
    from ray_galaxy.checkpoint import ModelDirError
    from ray_galaxy.data import DataError

    try:
        tune(cfg)
    except (ConfigError, DataError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

