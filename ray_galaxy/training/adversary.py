"""The adversarial fine-tuning phase on the training side: the critic, its optimiser and its steps.

The maths and the references are in :mod:`ray_galaxy.critic`. The phase starts from a converged
likelihood model (``TrainConfig.finetune_epochs`` after ``epochs``, as VQGAN and Stable
Diffusion's autoencoder add their critic), with the encoder frozen: the codes of the training
images, and with them the fitted sampler, stay valid. The critic judges two kinds of decoder
output, reconstructions of the batch and decodes of codes drawn from the sampler (what users
get), after the same differentiable augmentation as the real images, with a lazy R1 penalty.

The critic is not DDP-wrapped: its gradients are averaged over the workers by hand, because the
R1 penalty's double backward does not go through DDP's hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ray_galaxy.checkpoint import load_tensors
from ray_galaxy.config import TrainConfig, parse_policy
from ray_galaxy.critic import Critic, accuracy, adaptive_weight, critic_loss, diff_augment, generator_loss, r1_penalty
from ray_galaxy.generation.detail import draw_differentiable
from ray_galaxy.generation.sampler import MixtureSampler
from ray_galaxy.model import ConvVAE

CRITIC_FILE = "critic.pt"
CRITIC_OPTIMIZER_FILE = "critic_optimizer.pt"
# Adam's betas for the critic as in VQGAN and pix2pix: a short momentum keeps the two-player
# game from oscillating.
CRITIC_BETAS = (0.5, 0.9)
# Lazy regularisation (Karras et al. 2020, StyleGAN2, Sec. 3.1): R1 every 4th critic step,
# scaled by 4, costs a quarter of the double backward for the same effect.
R1_EVERY = 4
# A critic that wins outright: accuracy above this on real and generated images alike ...
WIN_ACCURACY = 0.95
# ... for this many epochs in a row is reported in the log.
WIN_EPOCHS = 3


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def _average_gradients(module: torch.nn.Module) -> None:
    """Average the gradients of ``module`` over the workers (nothing with one worker)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


@dataclass
class Adversary:
    """The critic, its optimiser, the settings of the phase and this epoch's statistics."""

    critic: Critic
    optimizer: torch.optim.Optimizer
    weight: float
    policy: tuple[str, ...] = ()
    r1_gamma: float = 0.0
    sampler: MixtureSampler | None = None
    sample_share: float = 0.0
    detail: dict[str, torch.Tensor] | None = None  # residual detail drawn on the decoder's images
    generator: torch.Generator = field(default_factory=torch.Generator)
    steps: int = 0
    stats: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: TrainConfig, sampler: MixtureSampler | None, seed: int) -> "Adversary":
        """A fresh critic (seeded), for the fine-tuning phase of ``cfg``; ``sampler`` gives the
        codes whose decodes the critic judges beside the reconstructions (None: reconstructions
        only)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            critic = Critic(cfg.critic_width)
        optimizer = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, betas=CRITIC_BETAS)
        share = cfg.adv_sample_share if sampler is not None else 0.0
        detail = sampler.detail if sampler is not None and cfg.adv_detail else None
        return cls(critic=critic, optimizer=optimizer, weight=cfg.adv_weight, policy=parse_policy(cfg.adv_augment),
                   r1_gamma=cfg.r1_gamma, sampler=sampler, sample_share=share, detail=detail,
                   generator=torch.Generator().manual_seed(seed))

    def to(self, device: Any) -> "Adversary":
        """The critic onto the worker's device."""
        self.critic.to(device)
        return self

    def _log(self, **values: float) -> None:
        for k, v in values.items():
            self.stats.setdefault(k, []).append(v)

    def sample_codes(self, n: int) -> torch.Tensor | None:
        """(k, D) codes from the sampler for this step (k = share of ``n``), None without one."""
        k = round(self.sample_share * n)
        if self.sampler is None or k == 0:
            return None
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
        return self.sampler.latents(k, seed)

    def as_drawn(self, means: torch.Tensor) -> torch.Tensor:
        """The decoder's images (B, 3, S, S) in [0, 1] as the critic sees them: with the residual
        detail drawn on them (differentiably) when it judges what users get, else as they are."""
        if self.detail is None:
            return means
        return draw_differentiable(means, self.detail, self.generator)

    def _judge(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The critic's logits for augmented ``real`` and ``fake`` images, judged in one batch
        (its BatchNorm must see both: :mod:`ray_galaxy.critic`); also the augmented real images."""
        real_aug = diff_augment(real, self.policy, self.generator)
        logits = self.critic(torch.cat([real_aug, diff_augment(fake, self.policy, self.generator)]))
        return logits[: len(real)], logits[len(real):], real_aug

    def generator_term(self, net: ConvVAE, rec_loss: torch.Tensor, fake: torch.Tensor,
                       real: torch.Tensor) -> torch.Tensor:
        """weight * lambda * L_G for the decoder's images ``fake`` (B', 3, S, S) in [0, 1], judged
        beside the batch's ``real`` images. The critic's parameters are frozen for it: this
        backward pass trains only the decoder."""
        self.critic.requires_grad_(False)
        try:
            gen = generator_loss(self._judge(real.detach(), fake)[1])
        finally:
            self.critic.requires_grad_(True)
        lam = adaptive_weight(rec_loss, gen, net.last_layer())
        self._log(adv_lambda=float(lam))
        return self.weight * lam * gen

    def critic_step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        """One step of the critic: hinge loss on augmented real and generated images, plus the
        lazy R1 penalty on the augmented real ones every :data:`R1_EVERY` steps."""
        lr, lf, real_aug = self._judge(real, fake.detach())
        loss = critic_loss(lr, lf)
        acc_real, acc_fake = accuracy(lr.detach(), lf.detach())
        self._log(critic_loss=loss.item(), critic_acc_real=acc_real, critic_acc_fake=acc_fake)
        if self.r1_gamma > 0 and self.steps % R1_EVERY == 0:
            r1 = r1_penalty(self.critic, real_aug, diff_augment(fake.detach(), self.policy, self.generator))
            loss = loss + 0.5 * self.r1_gamma * R1_EVERY * r1
            self._log(critic_r1=r1.item())
        self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(self.critic)
        self.optimizer.step()
        return loss.item()

    def epoch_metrics(self) -> dict[str, float]:
        """The epoch's means (critic loss, its accuracy on real and generated images, the
        adaptive weight, R1), reset; empty when the critic did not train."""
        if not self.stats.get("critic_loss"):
            return {}
        out = {k: _mean(v) for k, v in self.stats.items()}
        self.stats = {}
        return out

    def save(self, directory: str | Path) -> None:
        """Write the critic and its optimiser beside the VAE's checkpoint files."""
        d = Path(directory)
        torch.save(self.critic.state_dict(), d / CRITIC_FILE)
        torch.save(self.optimizer.state_dict(), d / CRITIC_OPTIMIZER_FILE)

    def load(self, directory: str | Path) -> bool:
        """Restore from a checkpoint directory; False when it holds no critic."""
        d = Path(directory)
        if not (d / CRITIC_FILE).is_file():
            return False
        self.critic.load_state_dict(load_tensors((d / CRITIC_FILE).read_bytes(), str(d / CRITIC_FILE)))
        self.optimizer.load_state_dict(
            load_tensors((d / CRITIC_OPTIMIZER_FILE).read_bytes(), str(d / CRITIC_OPTIMIZER_FILE)))
        return True


def critic_won(history: list[dict[str, Any]]) -> bool:
    """Whether the critic has won outright: accuracy of at least :data:`WIN_ACCURACY` on real and
    generated images in each of the last :data:`WIN_EPOCHS` epochs."""
    last = [h for h in history if "critic_acc_real" in h][-WIN_EPOCHS:]
    return len(last) == WIN_EPOCHS and all(
        min(h["critic_acc_real"], h["critic_acc_fake"]) >= WIN_ACCURACY for h in last)
