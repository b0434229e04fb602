"""The Ray Train worker side: schedules, the gradient guard, one training and one validation pass,
and :func:`train_loop_per_worker` built from them (Tune drives the same loop).

Everything here runs inside a Ray Train worker; the driver only imports it to name the function.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from ray.train.torch import get_device, prepare_model

from ray_galaxy.checkpoint import load_checkpoint, load_model_dir, save_checkpoint, unwrap
from ray_galaxy.config import TrainConfig
from ray_galaxy.console import fmt_seconds, log
from ray_galaxy.generation.sampler import read_sampler
from ray_galaxy.images import augment_d4
from ray_galaxy.model import ConvVAE
from ray_galaxy.runtime import quiet_train_worker
from ray_galaxy.tracking import Tracker
from ray_galaxy.training.adversary import Adversary, critic_won
from ray_galaxy.training.group import check_preemption, group_line, group_node_ids, swap_group_record

# The metric checkpoints are ranked by (Tune ranks trials by it too).
VAL_METRIC = "val_loss"
# The cosine schedule ends at this fraction of the peak learning rate.
LR_FLOOR = 0.05
# Rows of the local shuffle buffer (at least; 4 batches when larger): two prepared shards, so
# a streamed epoch mixes rows across shards, not only within one.
SHUFFLE_BUFFER_ROWS = 256

Autocast = Callable[[], ContextManager]


# --------------------------------------------------------------------------- schedules


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


# --------------------------------------------------------------------------- one pass


def to_images(batch: dict, device: Any) -> torch.Tensor:
    """A Ray Data batch of (B, S, S, 3) uint8 -> (B, 3, S, S) floats in [0, 1] on ``device``."""
    x = batch["image"].to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255)


def allreduce(values: list[float], device: Any) -> list[float]:
    """Sum a list of floats over all workers (unchanged with one worker)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, guard: GradGuard,
               x: torch.Tensor, beta: float, autocast: Autocast) -> tuple[float, float, float] | None:
    """One optimiser step on images ``x``: (mean loss, summed recon, summed kl), or None when the
    gradient guard skipped it."""
    net = unwrap(model)
    with autocast():
        out_a, mu, logvar = model(x)
    recon = net.recon_nll(out_a, x)
    kl = net.kl(mu, logvar)
    loss = (recon + beta * kl).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if not guard(list(model.parameters())):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return loss.item(), recon.sum().item(), kl.sum().item()


def finetune_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, guard: GradGuard,
                  x: torch.Tensor, beta: float, autocast: Autocast,
                  adversary: Adversary) -> tuple[float, float, float] | None:
    """One step of adversarial fine-tuning (frozen encoder): the decoder's likelihood loss plus the
    critic's weighted term on its reconstructions of ``x`` and its decodes of sampler codes, then
    one critic step on the same images. Returns what :func:`train_step` does (the likelihood
    part of the loss, so epochs of both phases compare)."""
    net = unwrap(model)
    extra = adversary.sample_codes(x.shape[0])
    with autocast():
        out = model(x, extra) if extra is not None else model(x)
    out_a, mu, logvar = out[:3]
    recon = net.recon_nll(out_a, x)
    kl = net.kl(mu, logvar)
    loss = (recon + beta * kl).mean()
    fake = adversary.as_drawn((torch.tanh(torch.cat([out_a] + list(out[3:])).float()) + 1) / 2)  # (B + k, 3, S, S)
    total = loss + adversary.generator_term(net, loss, fake, x)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if not guard([p for p in model.parameters() if p.requires_grad]):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    adversary.critic_step(x, fake)
    return loss.item(), recon.sum().item(), kl.sum().item()


def _val_sums(net: ConvVAE, shard: Any, device: Any, batch_size: int,
              autocast: Autocast) -> tuple[list[float], torch.Tensor]:
    """This shard's sums (n, recon, kl, psnr, squared error) and KL per latent dimension."""
    sums = [0.0] * 5
    kl_dim = torch.zeros(net.config.latent_dim, dtype=torch.float64, device=device)
    for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=False):
        x = to_images(batch, device)
        with autocast():
            a, mu, logvar = net(x)
            recon_img = (torch.tanh(net.decode_logits(mu).float()) + 1) / 2
        mse = (recon_img - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        sums[0] += x.shape[0]
        sums[1] += net.recon_nll(a, x).sum().item()
        sums[2] += net.kl(mu, logvar).sum().item()
        sums[3] += (10 * torch.log10(1.0 / mse)).sum().item()
        sums[4] += mse.sum().item()
        mu, logvar = mu.float(), logvar.float()
        kl_dim += (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).sum(0).double()
    return sums, kl_dim


def eval_step(model: torch.nn.Module, shard: Any, cfg: TrainConfig, device: Any, batch_size: int,
              autocast: Autocast) -> dict[str, Any]:
    """Validation over this worker's shard, summed over all workers.

    ``val_loss`` is the negative ELBO with the configured kl_weight (no warm-up), so it is
    comparable between epochs; ``val_bpd`` is the kl_weight=1 negative ELBO in bits/dim.
    """
    net = unwrap(model)
    net.eval()
    with torch.no_grad():
        sums, kl_dim = _val_sums(net, shard, device, batch_size, autocast)
    net.train()
    sums = allreduce(sums, device)
    kl_dim_all = allreduce(kl_dim.tolist(), device)
    n = max(sums[0], 1.0)
    recon, kl = sums[1] / n, sums[2] / n
    return {
        "val_images": int(sums[0]),
        VAL_METRIC: recon + cfg.kl_weight * kl,
        "val_recon": recon,
        "val_kl": kl,
        "val_bpd": float(net.bits_per_dim(torch.tensor(recon + kl))),
        "val_psnr": sums[3] / n,
        "val_kl_per_dim": [v / n for v in kl_dim_all],
    }


# --------------------------------------------------------------------------- the worker


@dataclass
class WorkerState:
    """What one worker carries from epoch to epoch."""

    cfg: TrainConfig
    rank: int
    world: int
    device: Any
    autocast: Autocast
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    guard: GradGuard
    generator: torch.Generator
    adversary: Adversary | None = None
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    node_ids: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # nodes announced as being preempted

    @property
    def batch_size(self) -> int:
        """The per-worker batch: the configured batch split over the workers."""
        return max(1, self.cfg.batch_size // self.world)


def _device(local_world: int) -> Any:
    """Ray Train's device for this worker; on CPU this node's cores are shared between its
    workers (Ray pins 1 thread for fractional CPUs)."""
    device = get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return device


def _autocast_for(device: Any) -> Autocast:
    """bf16 autocast on GPUs, nothing on CPUs."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _resume(cfg: TrainConfig, model: ConvVAE, optimizer: torch.optim.Optimizer,
            adversary: Adversary | None) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    """Load Ray Train's checkpoint into model, optimizer (and critic): (first epoch to run,
    history, what the checkpoint says of itself: ``epoch``, ``node_ids``, ``with_critic``)."""
    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0, [], {}
    with ckpt.as_directory() as d:
        model_sd, opt_sd, state = load_checkpoint(d)
        with_critic = adversary is not None and adversary.load(d)
    saved_model = state.get("model_config")
    if saved_model and saved_model != cfg.model_config().to_dict():
        raise RuntimeError(
            f"run {cfg.name!r} in {cfg.storage} has checkpoints of a different model "
            f"({saved_model}); choose a new --name to train this configuration")
    model.load_state_dict(model_sd)
    optimizer.load_state_dict(opt_sd)
    about = {"epoch": state["epoch"] + 1, "with_critic": with_critic,
             "node_ids": (state.get("metrics") or {}).get("worker_node_ids") or []}
    return state["epoch"] + 1, state.get("history", []), about


def _finetune_start(cfg: TrainConfig, model: ConvVAE, init_model: str, rank: int,
                    seed: int) -> tuple[Adversary, list[dict[str, Any]]]:
    """Begin the fine-tuning phase from the likelihood model directory ``init_model``: its weights
    (unless a fine-tuning checkpoint follows), a frozen encoder, a fresh critic judging decodes of
    the directory's sampler codes too; and the likelihood epochs' history."""
    md = load_model_dir(init_model)
    model.load_state_dict(md.model.state_dict())
    model.freeze_encoder()
    wanted = cfg.adv_sample_share > 0 or cfg.adv_detail
    sampler = read_sampler(init_model, md.sha256) if wanted else None
    if rank == 0 and wanted and sampler is None:
        log(f"fine-tuning: {init_model} has no sampler, so the critic judges reconstructions only, as they are")
    return Adversary.build(cfg, sampler, seed), list(md.metrics.get("history") or [])


def setup_worker(loop_config: dict[str, Any]) -> WorkerState:
    """Config, device, model (restored from Ray Train's checkpoint when resuming), optimizer; in
    the fine-tuning phase (``loop_config["finetune"]``) also the critic."""
    raw = loop_config["config"]
    cfg = TrainConfig(**{**raw, "channels": tuple(raw["channels"])})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(ctx.get_local_world_size())
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP broadcasts rank 0's anyway)
    model = ConvVAE(cfg.model_config())
    adversary, history, first = None, [], 0
    if loop_config.get("finetune"):
        adversary, history = _finetune_start(cfg, model, loop_config["finetune"], rank, cfg.seed * 1000 + 17)
        first = cfg.epochs
    # On the device before the optimizers load a checkpoint: load_state_dict puts Adam's state
    # where the parameters are, and a GPU step with that state left on the CPU fails.
    model.to(device)
    if adversary is not None:
        adversary.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    resumed, resumed_history, before = _resume(cfg, model, optimizer, adversary)
    if resumed:
        first, history = resumed, resumed_history
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7919 * first)
    node_ids = group_node_ids(world)
    if rank == 0:
        last_group = swap_group_record(node_ids)
        if before and last_group.get("node_ids"):  # the group that ran last, maybe without a checkpoint
            before = {**before, "node_ids": last_group["node_ids"], "preempted": last_group.get("preempted", [])}
        if before or cfg.max_workers > 1:
            log(loop_config.get("tag", "") + group_line(node_ids, before))
    return WorkerState(cfg=cfg, rank=rank, world=world, device=device, autocast=_autocast_for(device),
                       model=prepare_model(model), optimizer=optimizer, guard=GradGuard(cfg.grad_clip),
                       generator=generator, adversary=adversary, start_epoch=first, history=history,
                       node_ids=node_ids)


def train_epoch(w: WorkerState, shard: Any, epoch: int, beta: float) -> list[float]:
    """One pass over this worker's shard (D4-augmented): sums (n, loss, recon, kl) over all workers.

    The rows arrive in the epoch's seeded order (ray_galaxy.streaming); the local shuffle buffer
    and the augmentation are seeded by the seed, the epoch and the rank."""
    w.model.train()
    sums = [0.0, 0.0, 0.0, 0.0]
    for batch in shard.iter_torch_batches(
            batch_size=w.batch_size, drop_last=False,
            local_shuffle_buffer_size=max(SHUFFLE_BUFFER_ROWS, 4 * w.batch_size),
            local_shuffle_seed=w.cfg.seed + epoch * 101 + w.rank):
        x = augment_d4(to_images(batch, w.device), w.generator)
        if w.adversary is None:
            step = train_step(w.model, w.optimizer, w.guard, x, beta, w.autocast)
        else:
            step = finetune_step(w.model, w.optimizer, w.guard, x, beta, w.autocast, w.adversary)
        if step is None:
            continue
        b = x.shape[0]
        sums[0] += b
        sums[1] += step[0] * b
        sums[2] += step[1]
        sums[3] += step[2]
    return allreduce(sums, w.device)


def _progress_line(cfg: TrainConfig, metrics: dict[str, Any], epoch_times: list[float], last: int) -> str:
    """The one line per epoch people read; ``last`` is the phase's last epoch."""
    eta = (last - metrics["epoch"]) * float(np.mean(epoch_times[-5:]))
    return (f"epoch {metrics['epoch']}/{cfg.total_epochs}  train {metrics['train_loss']:.1f}  "
            f"val {metrics[VAL_METRIC]:.1f} (recon {metrics['val_recon']:.1f}, kl {metrics['val_kl']:.1f})  "
            f"psnr {metrics['val_psnr']:.2f} dB  {_critic_part(metrics)}{metrics['images_per_s']:.0f} img/s  "
            f"{metrics['epoch_seconds']:.1f}s/epoch  ETA {fmt_seconds(eta)}")


def _critic_part(metrics: dict[str, Any]) -> str:
    """'critic 0.91 acc 0.62/0.55 (x 12.3)  ' in the fine-tuning phase: the critic's hinge loss
    (about 1 while it cannot tell real from decoded, towards 0 when it wins), its accuracy on real
    and on generated images, and the adaptive weight."""
    if "critic_loss" not in metrics:
        return ""
    return (f"critic {metrics['critic_loss']:.2f} acc {metrics['critic_acc_real']:.2f}/"
            f"{metrics['critic_acc_fake']:.2f} (x {metrics['adv_lambda']:.3g})  ")


def _report(w: WorkerState, epoch: int, metrics: dict[str, Any]) -> None:
    """Report the epoch to Ray Train; rank 0 also writes the checkpoint."""
    reported = {k: v for k, v in metrics.items() if k != "val_kl_per_dim"}
    w.history.append(reported)
    if w.rank != 0:
        ray.train.report(reported)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if w.adversary is not None:
            w.adversary.save(tmp)
        save_checkpoint(tmp, w.model, w.optimizer, {
            "epoch": epoch, "history": w.history, "metrics": {**metrics, "worker_node_ids": w.node_ids},
            "model_config": w.cfg.model_config().to_dict(), "config": w.cfg.to_dict()})
        ray.train.report(reported, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_epoch_{epoch + 1:04d}")


def run_epoch(w: WorkerState, epoch: int, train_shard: Any, val_shard: Any) -> dict[str, Any]:
    """Train and validate one epoch; its metrics (summed over all workers)."""
    t0 = time.time()
    if w.adversary is None:
        beta, lr = kl_weight_at(w.cfg, epoch), lr_at(w.cfg, epoch)
    else:  # fine-tuning: the likelihood's own weights, a constant small step
        beta, lr = w.cfg.kl_weight, w.cfg.finetune_lr
    for group in w.optimizer.param_groups:
        group["lr"] = lr
    clipped0, skipped0 = w.guard.clipped, w.guard.skipped
    sums = train_epoch(w, train_shard, epoch, beta)
    train_seconds = time.time() - t0
    n = max(sums[0], 1.0)
    val = eval_step(w.model, val_shard, w.cfg, w.device, w.batch_size, w.autocast)
    critic = w.adversary.epoch_metrics() if w.adversary is not None else {}
    return {
        "epoch": epoch + 1,
        "train_loss": sums[1] / n,
        "train_recon": sums[2] / n,
        "train_kl": sums[3] / n,
        "kl_weight_now": beta,
        "lr_now": lr,
        "steps_clipped": w.guard.clipped - clipped0,
        "steps_skipped": w.guard.skipped - skipped0,
        "train_images": int(sums[0]),
        "workers": w.world,
        "worker_nodes": len(set(w.node_ids)),
        "images_per_s": sums[0] / max(train_seconds, 1e-9),
        "epoch_seconds": time.time() - t0,
        "decoder_sigma": float(unwrap(w.model).log_sigma.clamp(min=-6).exp()),
        **critic,
        **val,
    }


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: iterate the shard each epoch, report metrics and a checkpoint."""
    quiet_train_worker()
    w = setup_worker(loop_config)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    # In the fine-tuning phase the epochs before it are the likelihood phase's: they are in its
    # MLflow run already, and they say nothing of this phase's speed (the ETA).
    first = w.cfg.epochs if loop_config.get("finetune") else 0
    epoch_times = [h["epoch_seconds"] for h in w.history if h.get("epoch", 0) > first]
    # Only rank 0 records to MLflow (the driver's run, passed in the loop config); a resumed run
    # first records the epochs its checkpoint holds, so every run shows the whole history.
    tracker = Tracker.attach(loop_config.get("tracking")) if w.rank == 0 else Tracker()
    tracker.log_history([h for h in w.history if h.get("epoch", 0) > first])
    last = w.cfg.total_epochs if loop_config.get("finetune") else w.cfg.epochs
    tag = loop_config.get("tag", "")
    for epoch in range(w.start_epoch, last):
        metrics = run_epoch(w, epoch, train_shard, val_shard)
        epoch_times.append(metrics["epoch_seconds"])
        if w.rank == 0:
            log(tag + _progress_line(w.cfg, metrics, epoch_times, last))
        _report(w, epoch, metrics)
        w.preempted = check_preemption(w.rank, w.node_ids, w.preempted, epoch)
        tracker.log_history(w.history[-1:])
        if w.rank == 0 and critic_won(w.history) and not critic_won(w.history[:-1]):
            log(f"{tag}warning: the critic has won outright (accuracy >= 0.95 on real and generated images for "
                "3 epochs): the decoder cannot fool it, so its images are still easy to tell from real ones. For a "
                "closer game, weaken the critic (a higher --r1-gamma, more --adv-augment) or stop sooner (--finetune-epochs)")
