"""The settings of a sweep (:class:`TuneConfig`) and the TrainConfig each trial runs with."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ray_galaxy.config import (TRACKING_KEYS, ConfigError, TrainConfig, _h, check_experiment, from_mapping,
                               train_config)
from ray_galaxy.runtime import storage_path
from ray_galaxy.storage import join
from ray_galaxy.tuning.space import (DEFAULT_SEARCH_SPACE, DISTRIBUTIONS, SearchSpace,
                                     parse_search_space)

# bits/dim of the kl_weight=1 negative ELBO: unlike val_loss it does not depend on the
# kl_weight being searched, so trials with different weights are compared on one scale.
TUNE_METRIC = "val_bpd"
TUNE_MODE = "min"
# How the published model is chosen once the trials have ended (ASHA always uses TUNE_METRIC):
# val_bpd, or the morphology of its samples (ray_galaxy/tuning/ranking.py).
RANK_METRICS = ("val_bpd", "morphology")

SWEEP_FILE = "sweep.json"  # in <storage>/<name>/: the settings a resumed sweep must repeat

REPO = Path(__file__).resolve().parent.parent.parent


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
    metric: str = _h("How the published model is chosen: val_bpd (best validation bits/dim, what ASHA "
                     "stops by) or morphology (samples closest to the validation galaxies; each "
                     "completed trial is exported and sampled, docs/tune.md).", default="val_bpd")
    rank_samples: int = _h("With --metric morphology: galaxies drawn per completed trial.", default=500)
    seed: int = _h("Seed of the search-space sampling (training seeds come from the base config).",
                   default=0)
    tracking: bool = _h("Record the sweep in MLflow: a parent run, one child run per trial; "
                        "--no-tracking turns it off.", default=True)
    tracking_uri: str = _h("MLflow tracking server or store; empty: $MLFLOW_TRACKING_URI, else the local "
                           "store sqlite:///<storage>/mlflow.db (docs/tracking.md).", default="")
    experiment: str = _h("MLflow experiment the sweep is recorded in.", default="ray-galaxy")

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.metric not in RANK_METRICS:
            raise ConfigError(f"metric must be one of {', '.join(RANK_METRICS)}, got {self.metric!r}")
        for key in ("num_samples", "epochs", "max_concurrent_trials", "num_workers", "grace_period",
                    "rank_samples"):
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
        check_experiment(self.experiment)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able values."""
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d


def find_file(path: str) -> Path:
    """A local YAML path as given, or, when it is relative and only exists there, in the
    repository (``ray job submit`` from elsewhere, or a test's temporary working directory)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.is_file() and (REPO / p).is_file():
        return REPO / p
    return p


def run_dir(cfg: TuneConfig) -> str:
    """Where the sweep goes: ``<storage>/<name>``."""
    return join(storage_path(cfg.storage), cfg.name)


def trials_storage(cfg: TuneConfig) -> str:
    """Where the trials' Ray Train runs go: ``<storage>/<name>/trials``."""
    return join(run_dir(cfg), "trials")


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
    return train_config(find_file(cfg.train_config), **overrides)


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


def sweep_settings(cfg: TuneConfig, space: SearchSpace, base: TrainConfig) -> dict[str, Any]:
    """What a rerun must repeat to resume a sweep: the sweep config and the resolved base
    training config (storage and name locate the sweep, so they are left out)."""
    # metric and rank_samples only choose among ended trials: a finished sweep can be ranked again.
    where = ("storage", "name", "metric", "rank_samples", *TRACKING_KEYS)
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
