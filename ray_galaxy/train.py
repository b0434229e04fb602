"""Ray Train: data-parallel (DDP) training of the galaxy VAE, checkpoints, model export.

The driver (:func:`train`) reads and decodes the data once with Ray Data, starts a
``TorchTrainer`` whose workers each iterate their own shard, and exports the best checkpoint
as a model directory. Workers run :func:`train_loop_per_worker`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ray_galaxy.config import TrainConfig
from ray_galaxy.runtime import ensure_ray, ray_runtime_env, storage_path  # noqa: F401 - moved; callers migrate

# Training-loop helpers are reused by Tune, which drives the same loop.
VAL_METRIC = "val_loss"
# The cosine schedule ends at this fraction of the peak learning rate.
LR_FLOOR = 0.05


def _log(msg: str) -> None:
    # Not print(): inside Train workers print is patched to also log, doubling each line.
    sys.stdout.write(f"[ray-galaxy] {msg}\n")
    sys.stdout.flush()


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# --------------------------------------------------------------------------- worker side


def kl_weight_at(cfg: TrainConfig, epoch: int) -> float:
    """Linear KL warm-up (Bowman et al. 2016): 0 -> kl_weight over kl_warmup_epochs."""
    if cfg.kl_warmup_epochs <= 0:
        return cfg.kl_weight
    return cfg.kl_weight * min(1.0, (epoch + 1) / (cfg.kl_warmup_epochs + 1))


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of an epoch: constant, or a cosine from lr down to 5% of it at the last epoch
    (Loshchilov & Hutter 2017, without restarts). Per epoch, so a resumed run continues the curve."""
    if cfg.lr_schedule == "constant" or cfg.epochs <= 1:
        return cfg.lr
    t = epoch / (cfg.epochs - 1)
    return cfg.lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * t)))


class GradGuard:
    """Skips steps whose gradient is not finite and clips outliers (Seetharaman et al. 2020, AutoClip).

    The clip threshold is ``multiple`` times the median norm of the last ``window`` steps, so it
    follows the loss scale (the sigma-VAE's gradients grow as its sigma shrinks) and only cuts
    spikes, e.g. the first-epoch blow-up of a large latent with KL weight 1. Under DDP the
    gradients are already all-reduced, so every rank takes the same decision.
    """

    def __init__(self, multiple: float, window: int = 200, max_consecutive_skips: int = 25) -> None:
        self.multiple, self.max_skips = multiple, max_consecutive_skips
        self.norms: collections.deque[float] = collections.deque(maxlen=window)
        self.clipped = self.skipped = self.consecutive = 0

    def __call__(self, params: list) -> bool:
        """Clip in place; False when the step must be skipped (non-finite gradient)."""
        import torch

        limit = float("inf")
        if self.multiple > 0 and len(self.norms) >= 20:
            limit = self.multiple * float(np.median(self.norms))
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
        if not math.isfinite(norm):
            self.skipped += 1
            self.consecutive += 1
            if self.consecutive >= self.max_skips:
                raise FloatingPointError(
                    f"{self.consecutive} training steps in a row had a non-finite loss or gradient: "
                    "the model has diverged. Lower --lr or --kl-weight, or keep --grad-clip on "
                    "(Ray Train retries from the last checkpoint up to --max-failures times)")
            return False
        self.consecutive = 0
        self.clipped += norm > limit
        self.norms.append(norm)
        return True


def _to_images(batch: dict, device: Any) -> "torch.Tensor":
    import torch

    x = batch["image"].to(device, non_blocking=True)  # (B, S, S, 3) uint8
    return x.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S) in [0, 1]


def _allreduce(values: list[float], device: Any) -> list[float]:
    """Sum a list of floats over all workers."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def evaluate_shard(model: Any, shard: Any, cfg: TrainConfig, device: Any, batch_size: int,
                   autocast: Any) -> dict[str, Any]:
    """Validation over this worker's shard, summed over all workers.

    ``val_loss`` is the negative ELBO with the configured kl_weight (no warm-up), so it is
    comparable between epochs; ``val_bpd`` is the kl_weight=1 negative ELBO in bits/dim.
    """
    import torch

    from ray_galaxy.checkpoint import unwrap

    net = unwrap(model)
    net.eval()
    sums = [0.0] * 5  # n, recon, kl, psnr, sq-error
    kl_dim = torch.zeros(net.config.latent_dim, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=False):
            x = _to_images(batch, device)
            with autocast():
                a, mu, logvar = net(x)
                recon_img = (torch.tanh(net.decode_logits(mu).float()) + 1) / 2
            recon = net.recon_nll(a, x)
            kl = net.kl(mu, logvar)
            mse = (recon_img - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            sums[0] += x.shape[0]
            sums[1] += recon.sum().item()
            sums[2] += kl.sum().item()
            sums[3] += (10 * torch.log10(1.0 / mse)).sum().item()
            sums[4] += mse.sum().item()
            kl_dim += (0.5 * (mu.float() ** 2 + logvar.float().exp() - 1 - logvar.float())).sum(0).double()
    sums = _allreduce(sums, device)
    kl_dim_all = _allreduce(kl_dim.tolist(), device)
    n = max(sums[0], 1.0)
    recon, kl = sums[1] / n, sums[2] / n
    net.train()
    return {
        "val_images": int(sums[0]),
        VAL_METRIC: recon + cfg.kl_weight * kl,
        "val_recon": recon,
        "val_kl": kl,
        "val_bpd": float(net.bits_per_dim(torch.tensor(recon + kl))),
        "val_psnr": sums[3] / n,
        "val_kl_per_dim": [v / n for v in kl_dim_all],
    }


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: iterate the shard each epoch, report metrics and a checkpoint."""
    import contextlib

    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    from ray_galaxy.checkpoint import load_checkpoint, save_checkpoint
    from ray_galaxy.config import TrainConfig
    from ray_galaxy.data import augment_d4
    from ray_galaxy.model import ConvVAE

    import logging

    # Ray Train logs two INFO lines per checkpoint; our one progress line per epoch says it all.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = TrainConfig(**{**loop_config["config"], "channels": tuple(loop_config["config"]["channels"])})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    if device.type == "cpu":
        # Share this node's cores between its workers (Ray pins 1 thread for fractional CPUs).
        local = max(1, ctx.get_local_world_size())
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    torch.manual_seed(cfg.seed)  # same init on every rank (DDP broadcasts rank 0's anyway)
    model = ConvVAE(cfg.model_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    guard = GradGuard(cfg.grad_clip)
    start_epoch, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            model_sd, opt_sd, state = load_checkpoint(d)
        saved_model = state.get("model_config")
        if saved_model and saved_model != cfg.model_config().to_dict():
            raise RuntimeError(
                f"run {cfg.name!r} in {cfg.storage} has checkpoints of a different model "
                f"({saved_model}); choose a new --name to train this configuration")
        model.load_state_dict(model_sd)
        optimizer.load_state_dict(opt_sd)
        start_epoch, history = state["epoch"] + 1, state.get("history", [])
        if rank == 0:
            _log(f"resuming from checkpoint after epoch {state['epoch'] + 1}")
    model = prepare_model(model)
    net = model.module if hasattr(model, "module") else model

    # Where each rank runs, recorded with the metrics (placement is part of what a run did).
    node_ids = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        import torch.distributed as dist

        node_ids = [None] * world
        dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    per_worker_batch = max(1, cfg.batch_size // world)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7919 * start_epoch)
    epoch_times = [h["epoch_seconds"] for h in history]

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        beta = kl_weight_at(cfg, epoch)
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        clipped0, skipped0 = guard.clipped, guard.skipped
        model.train()
        sums = [0.0, 0.0, 0.0, 0.0]  # n, loss, recon, kl
        for batch in train_shard.iter_torch_batches(
                batch_size=per_worker_batch, drop_last=False, local_shuffle_buffer_size=4 * per_worker_batch,
                local_shuffle_seed=cfg.seed + epoch * 101 + rank):
            x = augment_d4(_to_images(batch, device), gen)
            with autocast():
                out_a, mu, logvar = model(x)
            recon = net.recon_nll(out_a, x)
            kl = net.kl(mu, logvar)
            loss = (recon + beta * kl).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not guard(list(model.parameters())):
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
            b = x.shape[0]
            sums[0] += b
            sums[1] += loss.item() * b
            sums[2] += recon.sum().item()
            sums[3] += kl.sum().item()
        train_seconds = time.time() - t0
        sums = _allreduce(sums, device)
        n = max(sums[0], 1.0)
        val = evaluate_shard(model, val_shard, cfg, device, per_worker_batch, autocast)
        epoch_seconds = time.time() - t0
        epoch_times.append(epoch_seconds)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": sums[1] / n,
            "train_recon": sums[2] / n,
            "train_kl": sums[3] / n,
            "kl_weight_now": beta,
            "lr_now": lr,
            "steps_clipped": guard.clipped - clipped0,
            "steps_skipped": guard.skipped - skipped0,
            "train_images": int(sums[0]),
            "workers": world,
            "worker_nodes": len(set(node_ids)),
            "images_per_s": sums[0] / max(train_seconds, 1e-9),
            "epoch_seconds": epoch_seconds,
            "decoder_sigma": float(net.log_sigma.clamp(min=-6).exp()),
            **val,
        }
        metrics_state = {**metrics, "worker_node_ids": node_ids}
        history.append({k: v for k, v in metrics.items() if k != "val_kl_per_dim"})
        reported = {k: v for k, v in metrics.items() if k != "val_kl_per_dim"}
        if rank == 0:
            remaining = cfg.epochs - epoch - 1
            eta = remaining * float(np.mean(epoch_times[-5:]))
            _log(f"epoch {epoch + 1}/{cfg.epochs}  train {metrics['train_loss']:.1f}  "
                 f"val {metrics[VAL_METRIC]:.1f} (recon {val['val_recon']:.1f}, kl {val['val_kl']:.1f})  "
                 f"psnr {val['val_psnr']:.2f} dB  {metrics['images_per_s']:.0f} img/s  "
                 f"{epoch_seconds:.1f}s/epoch  ETA {fmt_seconds(eta)}")
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, model, optimizer, {
                    "epoch": epoch, "history": history, "metrics": metrics_state,
                    "model_config": cfg.model_config().to_dict(), "config": cfg.to_dict()})
                ray.train.report(reported, checkpoint=Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_epoch_{epoch + 1:04d}")
        else:
            ray.train.report(reported)


# --------------------------------------------------------------------------- driver side


@dataclass
class TrainResult:
    """What a finished run produced."""

    model_dir: str
    run_dir: str
    metrics: dict[str, Any]


def make_trainer(cfg: TrainConfig, train_ds: Any, val_ds: Any, extra_loop_config: dict | None = None,
                 run_config: Any = None) -> Any:
    """The ``TorchTrainer`` for ``cfg`` (Tune builds one per trial the same way)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    scaling = ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                            resources_per_worker=resources, placement_strategy=cfg.placement_strategy)
    if run_config is None:
        run_config = RunConfig(
            name=cfg.name,
            storage_path=storage_path(cfg.storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute=VAL_METRIC,
                                               checkpoint_score_order="min"),
        )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), **(extra_loop_config or {})},
        scaling_config=scaling,
        run_config=run_config,
        datasets={"train": train_ds.randomize_block_order(), "val": val_ds},
    )


def export_model(checkpoint: Any, latest: Any, model_dir: str, cfg: TrainConfig,
                 data_stats: dict[str, Any], extra_config: dict | None = None) -> dict[str, Any]:
    """Turn the best checkpoint into a model directory with metrics and figures."""
    from ray_galaxy import figures
    from ray_galaxy.checkpoint import load_checkpoint, save_model_dir
    from ray_galaxy.model import ConvVAE

    with checkpoint.as_directory() as d:
        model_sd, _, state = load_checkpoint(d)
    history = state.get("history", [])
    if latest is not None:
        with latest.as_directory() as d:
            history = json.loads((Path(d) / "state.json").read_text()).get("history", history)
    model = ConvVAE(cfg.model_config())
    model.load_state_dict(model_sd)
    model.eval()
    best = state["metrics"]
    kl_dims = best.get("val_kl_per_dim") or [0.0] * cfg.latent_dim
    dims = figures.most_active_dims(kl_dims, k=2)
    files = {"samples.png": figures.png_bytes(figures.sample_grid(model, 64, seed=cfg.seed))}
    if len(dims) == 2:
        files["traversal.png"] = figures.png_bytes(figures.traversal(model, dims))
    metrics = {
        "best": {k: v for k, v in best.items()},
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "history": history,
        "traversal_dims": list(dims),
        "data": data_stats,
        "skipped_images": data_stats.get("skipped", 0),
    }
    save_model_dir(model_dir, {k: v.detach().cpu() for k, v in model.state_dict().items()},
                   cfg.model_config(), extra_config={"train": cfg.to_dict(), **(extra_config or {})},
                   metrics=metrics, files=files)
    return metrics


def fit_sampler_into(model_dir: str, cfg: TrainConfig) -> dict[str, Any] | None:
    """Fit the two-stage sampler (GMM + residual detail) of a fresh model directory and redraw
    samples.png and traversal.png from it. A failure here is reported, never fatal: the trained
    model is kept and ``jobs/fit_sampler.py`` can fit it later."""
    from ray_galaxy import figures
    from ray_galaxy.checkpoint import join, load_model_dir, write_bytes
    from ray_galaxy.evaluate import fit_gmm_sampler, generate, load_sampler
    from ray_galaxy.model import to_uint8

    t0 = time.time()
    # About a minute on GZ2 (10,000 codes, 40 full covariances): say so before the silence.
    _log("fitting the two-stage sampler (codes of the training images in 8 orientations, a Gaussian "
         "mixture, the residual detail model)...")
    try:
        meta = fit_gmm_sampler(model_dir, cfg.data, seed=cfg.seed, crop=cfg.crop)
        md = load_model_dir(model_dir)
        grid = figures.grid(to_uint8(generate(md, 64, cfg.seed, "gmm")).numpy())
        write_bytes(join(model_dir, "samples.png"), figures.png_bytes(grid))
        if md.model.config.latent_dim >= 2:
            trav, _ = figures.sampler_traversal(md.model, load_sampler(md))
            write_bytes(join(model_dir, "traversal.png"), figures.png_bytes(trav))
    except Exception as e:  # noqa: BLE001 - the model directory is already complete
        _log(f"warning: the sampler was not fitted ({type(e).__name__}: {e}); samples.png shows "
             f"prior samples. Fit it later with: python jobs/fit_sampler.py --model {model_dir}")
        return None
    kernels = (f", drawing from kernels on the codes (bandwidth {meta['bandwidth']:g})"
               if meta.get("kernels") == "codes" else "")
    _log(f"sampler: {meta['components']}-component GMM on the codes of {meta['train_images']} training "
         f"images in {meta['orientations']} orientations{kernels}"
         f"{' + residual detail (gain %.2f)' % meta['detail']['gain'] if meta['detail'] else ''} in "
         f"{time.time() - t0:.1f}s; samples.png and "
         "traversal.png redrawn from it")
    return meta


def train(cfg: TrainConfig) -> TrainResult:
    """Run a whole training job: data, Ray Train, export. Returns where the model went."""
    from ray_galaxy.checkpoint import join
    from ray_galaxy.data import load_datasets

    ensure_ray()
    t0 = time.time()
    _log(f"run {cfg.name!r}: data {cfg.data!r}, {cfg.image_size}px, preset {cfg.preset}, "
         f"latent {cfg.latent_dim}, likelihood {cfg.likelihood}, {cfg.epochs} epochs, "
         f"{cfg.num_workers} worker(s) on {'GPU' if cfg.use_gpu else 'CPU'}")
    train_ds, val_ds, stats = load_datasets(cfg.data, cfg.image_size, cfg.crop, cfg.val_fraction)
    _log(f"data: {stats.train_images} train / {stats.val_images} val images from {stats.files} files "
         f"in {stats.seconds:.1f}s; skipped {stats.skipped} {stats.skipped_by_reason or ''}")
    for example in stats.skipped_examples[:5]:
        _log(f"  skipped {example}")
    trainer = make_trainer(cfg, train_ds, val_ds)
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - give one clear line, keep the cause chained
        raise RuntimeError(f"training run {cfg.name!r} failed: {type(e).__name__}: {e}") from e
    best = result.get_best_checkpoint(metric=VAL_METRIC, mode="min") or result.checkpoint
    if best is None:
        raise RuntimeError(f"training run {cfg.name!r} produced no checkpoint")
    run_dir = join(storage_path(cfg.storage), cfg.name)
    model_dir = join(run_dir, "model")
    metrics = export_model(best, result.checkpoint, model_dir, cfg, stats.to_dict())
    if cfg.fit_sampler:
        fit_sampler_into(model_dir, cfg)
    b = metrics["best"]
    _log(f"best epoch {b['epoch']}: val loss {b[VAL_METRIC]:.1f}, {b['val_bpd']:.3f} bits/dim, "
         f"PSNR {b['val_psnr']:.2f} dB; total {fmt_seconds(time.time() - t0)}")
    _log(f"model directory: {model_dir}")
    return TrainResult(model_dir=model_dir, run_dir=run_dir, metrics=metrics)


def main_entry(cfg: TrainConfig) -> int:
    """Entry point shared by jobs: run, print errors as one line, return an exit code."""
    from ray_galaxy.checkpoint import ModelDirError
    from ray_galaxy.data import DataError

    try:
        train(cfg)
    except (DataError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
