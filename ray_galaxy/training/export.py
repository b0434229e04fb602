"""After training: the best checkpoint becomes a model directory, then its sampler is fitted.

Tune exports its best trial with the same two functions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray_galaxy import figures
from ray_galaxy.checkpoint import ModelDir, load_checkpoint, save_model_dir
from ray_galaxy.config import TrainConfig
from ray_galaxy.console import log
from ray_galaxy.generation.fit import fit_sampler
from ray_galaxy.generation.generator import Generator
from ray_galaxy.images import png_bytes
from ray_galaxy.model import ConvVAE
from ray_galaxy.storage import join, write_bytes


def _history(state: dict[str, Any], latest: Any) -> list[dict[str, Any]]:
    """Every epoch's metrics: from the latest checkpoint when there is one (it has seen the whole
    run), else from the best one."""
    history = state.get("history", [])
    if latest is not None:
        with latest.as_directory() as d:
            history = json.loads((Path(d) / "state.json").read_text()).get("history", history)
    return history


def _figures(gen: Generator, kl_per_dim: list[float] | None, seed: int) -> tuple[dict[str, bytes], list[int]]:
    """samples.png and traversal.png of a model as PNG bytes, and the traversal's two dims."""
    files = {"samples.png": png_bytes(figures.sample_grid(gen, 64, seed))}
    traversal = figures.traversal_figure(gen, kl_per_dim)
    if traversal is None:
        return files, []
    mosaic, dims = traversal
    files["traversal.png"] = png_bytes(mosaic)
    return files, list(dims)


def export_model(checkpoint: Any, latest: Any, model_dir: str, cfg: TrainConfig,
                 data_stats: dict[str, Any], extra_config: dict | None = None) -> dict[str, Any]:
    """Turn the best checkpoint into a model directory with metrics and figures; its metrics.

    ``latest`` (the run's last checkpoint, may be None) supplies the full history of epochs.
    """
    with checkpoint.as_directory() as d:
        model_sd, _, state = load_checkpoint(d)
    model = ConvVAE(cfg.model_config())
    model.load_state_dict(model_sd)
    model.eval()
    best = state["metrics"]
    # Not saved yet: the figures come from the same Generator every reader of the directory uses.
    unsaved = ModelDir(uri=model_dir, model_config=cfg.model_config(), model=model, config={},
                       metrics={"best": best}, sha256="")
    files, dims = _figures(Generator(unsaved, None, "not fitted yet"), best.get("val_kl_per_dim"), cfg.seed)
    history = _history(state, latest)
    metrics = {
        "best": dict(best),
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "history": history,
        "traversal_dims": dims,
        "data": data_stats,
        "skipped_images": data_stats.get("skipped", 0),
    }
    save_model_dir(model_dir, {k: v.detach().cpu() for k, v in model.state_dict().items()},
                   cfg.model_config(), extra_config={"train": cfg.to_dict(), **(extra_config or {})},
                   metrics=metrics, files=files)
    return metrics


def _sampler_line(meta: dict[str, Any], seconds: float) -> str:
    """What the fitted sampler is, in one line."""
    kernels = (f", drawing from kernels on the codes (bandwidth {meta['bandwidth']:g})"
               if meta.get("kernels") == "codes" else "")
    detail = (f" + residual detail ({meta['detail'].get('kind', 'galaxy')}, gain {meta['detail']['gain']:.2f})"
              if meta.get("detail") else "")
    labels = f", per label ({', '.join(meta['labels'])})" if meta.get("labels") else ""
    if meta.get("codes_from"):
        kept = meta.get("detail") and meta["detail"].get("kept")
        return (f"sampler: mixture and kernels{labels}{', and residual detail,' if kept else ''} taken over from "
                f"{meta['codes_from']} (same encoder){'' if kept else ', residual detail refitted'}{detail} in "
                f"{seconds:.1f}s; samples.png and traversal.png redrawn from it")
    return (f"sampler: {meta['components']}-component GMM on the codes of {meta['train_images']} training "
            f"images in {meta['orientations']} orientations{kernels}{labels}{detail} in {seconds:.1f}s; "
            "samples.png and traversal.png redrawn from it")


def fit_sampler_into(model_dir: str, cfg: TrainConfig, codes_from: str | None = None,
                     keep_detail: bool = False) -> dict[str, Any] | None:
    """Fit the two-stage sampler (GMM + residual detail) of a fresh model directory and redraw
    samples.png and traversal.png from it; sampler.json's content.

    A failure here is reported, never fatal: the trained model is kept and
    ``jobs/fit_sampler.py`` can fit it later. ``codes_from``: take the mixture and kernels over
    from that model directory (same encoder; :func:`ray_galaxy.generation.fit.fit_sampler`).
    """
    t0 = time.time()
    # Minutes on GZ2 (40,000 codes, 40 full covariances): say so before the silence.
    if codes_from:
        log(f"sampler: taking the codes' mixture and kernels over from {codes_from} (same encoder)...")
    else:
        log("fitting the two-stage sampler (codes of the training images in 8 orientations, a Gaussian "
            "mixture, the residual detail model)...")
    try:
        meta = fit_sampler(model_dir, cfg.data, seed=cfg.seed, crop=cfg.crop, labels=cfg.labels,
                           codes_from=codes_from, detail=cfg.detail, keep_detail=keep_detail)
        files, _ = _figures(Generator.load(model_dir), None, cfg.seed)
        for name, data in files.items():
            write_bytes(join(model_dir, name), data)
    except Exception as e:  # noqa: BLE001 - the model directory is already complete
        log(f"warning: the sampler was not fitted ({type(e).__name__}: {e}); samples.png shows "
            f"prior samples. Fit it later with: python jobs/fit_sampler.py --model {model_dir}")
        return None
    log(_sampler_line(meta, time.time() - t0))
    return meta
