"""The ``search_space`` of a sweep: which TrainConfig fields are searched, and how.

``{field: {distribution: args}}`` searches a field; ``{field: value}`` fixes it for every
trial. Parsing checks names, distributions and value types up front, so a typo is one clear
:class:`~ray_galaxy.config.ConfigError` rather than a failed trial minutes into a sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, get_type_hints

from ray import tune as raytune

from ray_galaxy.config import ConfigError, TrainConfig, _coerce, field_names

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
CATEGORICAL = ("choice", "grid")
INT_DISTRIBUTIONS = ("randint", "lograndint")
LOG_DISTRIBUTIONS = ("loguniform", "qloguniform", "lograndint")

# TrainConfig fields that are the same for every trial of a sweep, so not searchable: the
# sweep sets them (TuneConfig), or, for preset, they were applied with the base config; labels
# describe the data, not the model.
SWEEP_FIELDS = ("data", "storage", "name", "epochs", "num_workers", "use_gpu", "cpus_per_worker",
                "preset", "labels")

DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "latent_dim": {"choice": [16, 32, 64, 128]},
    "lr": {"loguniform": [3e-4, 3e-3]},
    "kl_weight": {"loguniform": [0.05, 2.0]},
}


def _plain(v: Any) -> Any:
    """Tuples as lists: the form YAML, JSON and Tune's param_space hold."""
    return list(v) if isinstance(v, tuple) else v


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig field: its distribution and the distribution's arguments."""

    name: str
    distribution: str
    args: tuple[Any, ...]

    @property
    def categorical(self) -> bool:
        """Whether values are picked from a list (choice, grid) rather than a range."""
        return self.distribution in CATEGORICAL

    @property
    def log_scale(self) -> bool:
        """Whether the range is sampled (and best plotted) on a log scale."""
        return self.distribution in LOG_DISTRIBUTIONS

    def candidates(self) -> list[Any]:
        """Values that bound what can be sampled: every choice, or a range's end points."""
        if self.categorical:
            return list(self.args)
        low, high = self.args[0], self.args[1]
        return [low, high - 1 if self.distribution in INT_DISTRIBUTIONS else high]

    def domain(self) -> Any:
        """The Ray Tune search domain."""
        values = [_plain(v) for v in self.args]
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
        """The searched fields, in the order of the YAML."""
        return [p.name for p in self.params]

    def to_spec(self) -> dict[str, Any]:
        """The space in the YAML form, values converted to their types (for config.json)."""
        plain = {p.name: {p.distribution: [_plain(v) for v in p.args]} for p in self.params}
        return {**{k: _plain(v) for k, v in self.fixed.items()}, **plain}

    def num_trials(self, num_samples: int) -> int:
        """Trials a sweep runs: Tune repeats the whole grid num_samples times."""
        return num_samples * math.prod(len(p.args) for p in self.params if p.distribution == "grid")

    def param_space(self) -> dict[str, Any]:
        """The Tuner's ``param_space``: one flat key per TrainConfig field."""
        return {**{k: _plain(v) for k, v in self.fixed.items()},
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
        _check_name(name, valid)
        typ = hints[name]
        if isinstance(value, Mapping):
            params.append(_parse_searched(name, value, typ))
        else:
            fixed[name] = _parse_fixed(name, value, typ)
    return SearchSpace(params=tuple(params), fixed=fixed)


def _check_name(name: str, valid: list[str]) -> None:
    if name in SWEEP_FIELDS:
        raise ConfigError(f"search_space: {name!r} is set by the sweep for every trial, not "
                          f"searched; searchable fields are: {', '.join(valid)}")
    if name not in valid:
        raise ConfigError(f"search_space: unknown TrainConfig field {name!r}; "
                          f"valid fields are: {', '.join(valid)}")


def _parse_fixed(name: str, value: Any, typ: Any) -> Any:
    is_tuple = getattr(typ, "__origin__", None) is tuple
    if isinstance(value, (list, tuple)) and not is_tuple:
        # A bare list is the most likely slip for {choice: [...]}; fixing a scalar to it is never meant.
        raise ConfigError(f"search_space: {name}: a list fixes nothing here; to search "
                          f"these values write {{choice: {list(value)}}}")
    return _coerce(f"search_space: {name}", typ, value)


def _parse_searched(name: str, value: Mapping[str, Any], typ: Any) -> Param:
    if len(value) != 1:
        raise ConfigError(f"search_space: {name}: expected one {{distribution: args}}, got {dict(value)}")
    ((dist, args),) = value.items()
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"search_space: unknown distribution {dist!r} for {name!r}; valid ones "
                          f"are: {', '.join(DISTRIBUTIONS)}")
    return _parse_param(name, dist, args, typ)


def _parse_param(name: str, dist: str, args: Any, typ: Any) -> Param:
    where = f"search_space: {name}: {dist}"
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"{where} needs {DISTRIBUTIONS[dist]}, got {args!r}")
    if dist in CATEGORICAL:
        return Param(name, dist, tuple(_coerce(where, typ, v) for v in args))
    if typ not in (int, float):
        raise ConfigError(f"{where}: {name} is not numeric; use choice or grid")
    if typ is int and dist not in INT_DISTRIBUTIONS:
        raise ConfigError(f"{where}: {name} is an integer; use choice, grid, randint or lograndint")
    want = 3 if dist.startswith("q") else 2
    if len(args) != want:
        raise ConfigError(f"{where} needs {DISTRIBUTIONS[dist]}, got {list(args)}")
    num = int if dist in INT_DISTRIBUTIONS else float
    values = tuple(_coerce(where, num, v) for v in args)
    _check_range(where, dist, values)
    return Param(name, dist, values)


def _check_range(where: str, dist: str, values: tuple[Any, ...]) -> None:
    low, high = values[0], values[1]
    if not low < high:
        raise ConfigError(f"{where}: low must be below high, got {list(values)}")
    if dist in LOG_DISTRIBUTIONS and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
    if len(values) == 3 and values[2] <= 0:
        raise ConfigError(f"{where}: q must be > 0, got {values[2]}")
