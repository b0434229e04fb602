"""The adversarial term on the training side: the critic, its optimiser and its two steps.

The maths and the references are in :mod:`ray_galaxy.critic`. Here: when the term is on, how a
worker builds the critic, adds the weighted generator loss to the VAE's loss, trains the critic
on the same batch, and saves both into the training checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ray.train.torch import prepare_model

from ray_galaxy.checkpoint import load_tensors
from ray_galaxy.config import TrainConfig
from ray_galaxy.critic import PatchCritic, adaptive_weight, critic_loss, generator_loss
from ray_galaxy.model import ConvVAE

CRITIC_FILE = "critic.pt"
CRITIC_OPTIMIZER_FILE = "critic_optimizer.pt"
# Adam's betas for the critic as in VQGAN and pix2pix: a short momentum keeps the two-player
# game from oscillating.
CRITIC_BETAS = (0.5, 0.9)


def start_epoch(cfg: TrainConfig) -> int:
    """The first epoch with the adversarial term (0-based); ``cfg.epochs`` when it is off."""
    if cfg.adv_weight <= 0:
        return cfg.epochs
    return math.floor(cfg.adv_start * cfg.epochs)


@dataclass
class Adversary:
    """The critic (DDP-wrapped when there are several workers), its bare module and optimiser."""

    critic: torch.nn.Module
    bare: PatchCritic
    optimizer: torch.optim.Optimizer
    weight: float
    critic_losses: list[float] = field(default_factory=list)  # this epoch's, per step
    lambdas: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, cfg: TrainConfig) -> "Adversary":
        """A fresh critic, on the worker's device (the worker has seeded torch already)."""
        bare = PatchCritic()
        optimizer = torch.optim.Adam(bare.parameters(), lr=cfg.lr, betas=CRITIC_BETAS)
        return cls(critic=prepare_model(bare), bare=bare, optimizer=optimizer, weight=cfg.adv_weight)

    def generator_term(self, net: ConvVAE, rec_loss: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """weight * lambda * L_G for the decoder's images ``fake`` (B, 3, S, S) in [0, 1].

        The bare critic, with its parameters frozen, judges them: this backward pass trains only
        the VAE (the critic's own step follows, with its own forward and backward)."""
        self.bare.requires_grad_(False)
        try:
            gen = generator_loss(self.bare(fake))
        finally:
            self.bare.requires_grad_(True)
        lam = adaptive_weight(rec_loss, gen, net.last_layer())
        self.lambdas.append(float(lam))
        return self.weight * lam * gen

    def critic_step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        """One hinge-loss step of the critic on a batch of real and decoded images."""
        logits = self.critic(torch.cat([real, fake.detach()]))
        loss = critic_loss(logits[: real.shape[0]], logits[real.shape[0]:])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.critic_losses.append(loss.item())
        return self.critic_losses[-1]

    def epoch_metrics(self) -> dict[str, float]:
        """The epoch's mean critic loss and adaptive weight (empty when the term was off), reset."""
        if not self.critic_losses:
            return {}
        out = {"critic_loss": sum(self.critic_losses) / len(self.critic_losses),
               "adv_lambda": sum(self.lambdas) / max(len(self.lambdas), 1)}
        self.critic_losses, self.lambdas = [], []
        return out

    def set_lr(self, lr: float) -> None:
        """Follow the VAE's learning-rate schedule."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def save(self, directory: str | Path) -> None:
        """Write the critic and its optimiser beside the VAE's checkpoint files."""
        d = Path(directory)
        torch.save(self.bare.state_dict(), d / CRITIC_FILE)
        torch.save(self.optimizer.state_dict(), d / CRITIC_OPTIMIZER_FILE)

    def load(self, directory: str | Path) -> bool:
        """Restore from a checkpoint directory; False when it holds no critic (saved before the
        term was on, or by a run without it)."""
        d = Path(directory)
        if not (d / CRITIC_FILE).is_file():
            return False
        self.bare.load_state_dict(load_tensors((d / CRITIC_FILE).read_bytes(), str(d / CRITIC_FILE)))
        self.optimizer.load_state_dict(
            load_tensors((d / CRITIC_OPTIMIZER_FILE).read_bytes(), str(d / CRITIC_OPTIMIZER_FILE)))
        return True
