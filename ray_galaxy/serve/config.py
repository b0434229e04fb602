"""The Serve application's settings: :class:`ServeConfig` (the ``args`` of cluster/serve.yaml),
the served models' names, the request limits of the HTTP API, deployment names and the bearer
token holder."""

from __future__ import annotations

import dataclasses
import hmac
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ray_galaxy.config import ConfigError, from_mapping

APP_NAME = "galaxy"
INGRESS = "GalaxyAPI"
DECODER = "Decoder"
DEPLOYMENT_NAMES = (INGRESS, DECODER)
IMPORT_PATH = "ray_galaxy.serve.app:app_builder"

# Request limits (part of the API: changing them changes what clients may send).
MAX_N = 64                  # images per POST /sample
MAX_SEED = 2 ** 63 - 1      # torch.Generator.manual_seed range we accept
MAX_TEMPERATURE = 10.0
MAX_ABS_LATENT = 100.0      # |z_i| bound for latent vectors sent by clients
MAX_INTERP_STEPS = 32
MAX_TRAVERSE_STEPS = 16
MAX_TRAVERSE_RANGE = 10.0
MAX_LABEL_CHARS = 200      # a class name (``label=``); the model's labels are checked after
MAX_MODEL_CHARS = 200      # a model's name (``model=``); the served names are checked after
# The explorer page sets this cookie from ``GET /?token=...``: a browser cannot send a bearer
# header when it loads a page, its script and its images.
TOKEN_COOKIE = "ray_galaxy_token"
# The HTTP proxies Serve can run in front of the app (ServeConfig.proxy).
PROXIES = ("default", "haproxy")
# How long the ingress keeps retrying while the decoder is unavailable or mid-swap.
DECODER_RETRY_S = 20.0
# A name given to a model as NAME=PATH (also what tells such an entry from a bare path).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def model_name(uri: str) -> str:
    """A model's name: the run directory of ``<storage>/<run>/model``, else the last part."""
    parts = [p for p in uri.rstrip("/").replace("\\", "/").split("/") if p and not p.endswith(":")]
    if len(parts) >= 2 and parts[-1] == "model":
        return parts[-2]
    return parts[-1] if parts else uri


def split_model(entry: str) -> tuple[str, str]:
    """(name, location) of one ``model`` entry: ``NAME=PATH`` names it; a bare path or URI is
    named by :func:`model_name`."""
    name, sep, location = entry.partition("=")
    if sep and location and MODEL_NAME.fullmatch(name):
        return name, location
    return model_name(entry), entry


def named_models(model: str | tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, location) of every model entry, in order; a :class:`ConfigError` for an empty
    entry or two models that would share a name (it says how to name one)."""
    entries = [model] if isinstance(model, str) else list(model)
    if not entries or not all(isinstance(e, str) and e.strip() for e in entries):
        raise ConfigError(f"model: a model directory path or URI is required (or a list of them), got {model!r}")
    seen: dict[str, str] = {}
    for entry in entries:
        name, location = split_model(entry)
        if name in seen:
            raise ConfigError(
                f"model: {seen[name]!r} and {entry!r} would both be served as {name!r} (a model's name is "
                f"its directory's last part, or the run folder of <run>/model); name one of them as "
                f"NAME=PATH, e.g. {name}-2={location}")
        seen[name] = entry
    return [split_model(e) for e in entries]


@dataclass(frozen=True)
class ServeConfig:
    """Application arguments (``args:`` in cluster/serve.yaml; flags of jobs/serve.py)."""

    # One model directory, or a list of them served from one application (model multiplexing;
    # a request picks one with model=NAME, default the first). An entry NAME=PATH names a model.
    model: str | tuple[str, ...] = "runs/galaxy-vae/model"
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0
    max_body_bytes: int = 8 * 1024 * 1024
    token_env: str = "RAY_GALAXY_TOKEN"
    device: str = "auto"
    torch_threads: int = 0
    # Rows per forward pass inside a decoder batch. 0 = auto: the whole batch on a GPU, one row
    # at a time on a CPU, where the float64 decoder is fastest per image on single rows (its
    # activations for a bigger batch spill the cache; docs/benchmarks-history.md has the sweep).
    # Batching still pays there: the requests that arrive while a batch decodes share the next
    # one, with its per-call costs (docs/benchmarks-history.md).
    decode_chunk_rows: int = 0
    # Models a Decoder replica keeps loaded when several are served (least recently used out).
    max_num_models_per_replica: int = 3
    # The HTTP proxy in front of the app: Ray Serve's own ("default") or HAProxy, which Ray 2.60
    # runs when RAY_SERVE_ENABLE_HA_PROXY=1 is in the cluster's environment (serve.proxy).
    proxy: str = "default"
    # The decoder inside the ingress replicas (one deployment, GalaxyAPI) instead of replicas of
    # its own: each request skips a hop between actors. One model only; the ingress then holds
    # the decoder's resources and scales as one (docs/serve.md, "One deployment or two").
    fused: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.model, list):
            object.__setattr__(self, "model", tuple(self.model))
        named_models(self.model)
        if self.max_num_models_per_replica < 1:
            raise ConfigError(f"max_num_models_per_replica must be >= 1, got {self.max_num_models_per_replica}")
        if not 1 <= self.max_batch_size <= 1024:
            raise ConfigError(f"max_batch_size must be in 1..1024, got {self.max_batch_size}")
        if not (math.isfinite(self.batch_wait_timeout_s) and 0 <= self.batch_wait_timeout_s <= 5):
            raise ConfigError(f"batch_wait_timeout_s must be in [0, 5], got {self.batch_wait_timeout_s}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be one of auto, cpu, cuda; got {self.device!r}")
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads must be >= 0, got {self.torch_threads}")
        if self.decode_chunk_rows < 0:
            raise ConfigError(f"decode_chunk_rows must be >= 0 (0 = auto), got {self.decode_chunk_rows}")
        if self.proxy not in PROXIES:
            raise ConfigError(f"proxy must be one of {', '.join(PROXIES)}; got {self.proxy!r}")
        if self.fused and self.multiplexed:
            raise ConfigError("fused: true serves one model (the decoder lives in each ingress replica); "
                              "several models need the Decoder deployment: set fused: false")

    @property
    def models(self) -> list[tuple[str, str]]:
        """(name, location) of every served model; the first is the default."""
        return named_models(self.model)

    @property
    def multiplexed(self) -> bool:
        """Several models behind this application (a request names one with ``model=``)."""
        return not isinstance(self.model, str) and len(self.model) > 1

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values."""
        return dataclasses.asdict(self)


def serve_config(args: Mapping[str, Any] | ServeConfig) -> ServeConfig:
    """A :class:`ServeConfig` from application args; unknown keys are a :class:`ConfigError`."""
    if isinstance(args, ServeConfig):
        return args
    return from_mapping(ServeConfig, dict(args or {}), source="serve application args")


class Token:
    """The bearer token, kept out of reprs and logs."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Token(***)"

    def matches(self, presented: str) -> bool:
        """Constant-time comparison with what a client presented."""
        return hmac.compare_digest(self.value.encode(), presented.encode())
