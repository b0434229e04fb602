"""Training checkpoints and the model directory: the one format every job shares.

A **model directory** (local path or any pyarrow URI such as s3://bucket/prefix) holds:

    model.pt       state dict of :class:`ConvVAE` (tensors only: torch.load(weights_only=True))
    config.json    {"format": 1, "model": ModelConfig, "train": TrainConfig, ...}
    metrics.json   best-epoch metrics, per-epoch history, data counts
    samples.png    8x8 grid of samples from a fixed seed (the fitted sampler's, else the prior's)
    traversal.png  two latent dimensions swept over rows and columns, the others at 0
    sampler.pt     optional two-stage sampler: GMM over the codes + residual detail model
    sampler.json   its description (written last; jobs/fit_sampler.py, or train's fit_sampler)

``config.json`` is written last, so a directory without it is unfinished and never loaded.
A **training checkpoint** (written by each epoch) holds model.pt, optimizer.pt and state.json.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ray_galaxy.config import ModelConfig
from ray_galaxy.model import ConvVAE
from ray_galaxy.storage import exists, is_remote, join, read_bytes, resolve, write_bytes

FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


class ModelDirError(RuntimeError):
    """A model directory is missing, unfinished or does not match its config."""


# --------------------------------------------------------------------------- tensors


def tensor_bytes(obj: Any) -> bytes:
    """A torch.save of tensors (and plain containers of them) as bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_tensors(data: bytes, what: str) -> Any:
    """Load a torch file allowing tensors only: a pickle with code in it is refused."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelDirError(f"{what} is not a tensors-only torch file: {e}") from None


def unwrap(model: torch.nn.Module) -> ConvVAE:
    """The bare model behind a DDP wrapper."""
    return getattr(model, "module", model)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Write a training checkpoint into a local directory (state.json last)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(model).state_dict(), d / MODEL_FILE)
    torch.save(optimizer.state_dict(), d / OPTIMIZER_FILE)
    tmp = d / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.rename(d / STATE_FILE)


def load_checkpoint(directory: str | Path) -> tuple[dict, dict, dict[str, Any]]:
    """(model state dict, optimizer state dict, state) from a local checkpoint directory."""
    d = Path(directory)
    if not (d / STATE_FILE).is_file():
        raise ModelDirError(f"checkpoint {d} is incomplete (no {STATE_FILE})")
    model_sd = load_tensors((d / MODEL_FILE).read_bytes(), str(d / MODEL_FILE))
    opt_sd = load_tensors((d / OPTIMIZER_FILE).read_bytes(), str(d / OPTIMIZER_FILE))
    return model_sd, opt_sd, json.loads((d / STATE_FILE).read_text())


# --------------------------------------------------------------------------- model directory


@dataclass
class ModelDir:
    """A loaded model directory."""

    uri: str
    model_config: ModelConfig
    model: ConvVAE | None  # None when loaded with weights=False (config, metrics and hash only)
    config: dict[str, Any]
    metrics: dict[str, Any]
    sha256: str  # of model.pt's bytes: the sampler records it, Serve derives its version from it

    @property
    def version(self) -> str:
        """Short model version shown by Serve and recorded with generated galaxies."""
        return self.sha256[:16]

    @property
    def train_config(self) -> dict[str, Any]:
        """The training settings recorded in config.json (empty for a directory without them)."""
        return self.config.get("train") or {}


def save_model_dir(uri: str, state_dict: dict[str, torch.Tensor], model_config: ModelConfig,
                   extra_config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                   files: dict[str, bytes] | None = None) -> str:
    """Write a model directory at ``uri`` (local or remote); returns the URI.

    Locally the directory is assembled beside the target and swapped in, so readers see the
    old or the new model, never a mix. Remotely config.json is written last as the marker.
    """
    config = {"format": FORMAT_VERSION, "model": model_config.to_dict(), **(extra_config or {})}
    payload = {MODEL_FILE: tensor_bytes(state_dict),
               METRICS_FILE: json.dumps(metrics or {}, indent=1, default=str).encode(),
               **(files or {})}
    config_bytes = json.dumps(config, indent=1, default=str).encode()
    if is_remote(uri):
        if exists(join(uri, CONFIG_FILE)):
            fs, path = resolve(join(uri, CONFIG_FILE))
            fs.delete_file(path)  # unmark first: a crash mid-write leaves "unfinished"
        for name, data in payload.items():
            write_bytes(join(uri, name), data)
        write_bytes(join(uri, CONFIG_FILE), config_bytes)
        return uri
    target = Path(resolve(uri)[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    for name, data in payload.items():
        (tmp / name).write_bytes(data)
    (tmp / CONFIG_FILE).write_bytes(config_bytes)
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    return str(target)


def load_model_dir(uri: str, device: str | torch.device = "cpu", weights: bool = True) -> ModelDir:
    """Load a model directory (local or URI) into an eval-mode :class:`ConvVAE`.

    model.pt is read and hashed once here; ``weights=False`` skips building the network (an
    HTTP ingress needs the config and the version, not the weights).
    """
    try:
        config = json.loads(read_bytes(join(uri, CONFIG_FILE)))
    except FileNotFoundError:
        raise ModelDirError(
            f"{uri} is not a finished model directory (no {CONFIG_FILE}); "
            "train one with jobs/train.py") from None
    except OSError as e:
        raise ModelDirError(f"cannot read model directory {uri}: {e}") from None
    if config.get("format") != FORMAT_VERSION:
        raise ModelDirError(f"{uri}: unsupported model directory format {config.get('format')!r}")
    model_cfg = ModelConfig.from_dict(config["model"])
    try:
        model_bytes = read_bytes(join(uri, MODEL_FILE))
    except FileNotFoundError:
        raise ModelDirError(f"{uri}: {MODEL_FILE} is missing") from None
    model = None
    if weights:
        model = ConvVAE(model_cfg)
        try:
            model.load_state_dict(load_tensors(model_bytes, join(uri, MODEL_FILE)))
        except RuntimeError as e:
            raise ModelDirError(f"{uri}: weights do not match config.json: {e}") from None
        model = model.to(device).eval()
    try:
        metrics = json.loads(read_bytes(join(uri, METRICS_FILE)))
    except (FileNotFoundError, OSError):
        metrics = {}
    return ModelDir(uri=uri, model_config=model_cfg, model=model, config=config, metrics=metrics,
                    sha256=hashlib.sha256(model_bytes).hexdigest())
