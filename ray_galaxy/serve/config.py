"""The Serve application's settings: :class:`ServeConfig` (the ``args`` of cluster/serve.yaml),
the request limits of the HTTP API, deployment names and the bearer token holder."""

from __future__ import annotations

import dataclasses
import hmac
import math
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
# The explorer page sets this cookie from ``GET /?token=...``: a browser cannot send a bearer
# header when it loads a page, its script and its images.
TOKEN_COOKIE = "ray_galaxy_token"
# How long the ingress keeps retrying while the decoder is unavailable or mid-swap.
DECODER_RETRY_S = 20.0


@dataclass(frozen=True)
class ServeConfig:
    """Application arguments (``args:`` in cluster/serve.yaml; flags of jobs/serve.py)."""

    model: str = "runs/galaxy-vae/model"
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

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: a model directory path or URI is required")
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
