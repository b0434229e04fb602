"""Adversarial patch critic: a training-only term that makes the decoder's means sharp.

A VAE decoder trained on a pixel likelihood outputs E[x | z], which blurs whatever the latent
code does not pin down. Production autoencoders (VQGAN, Esser et al. 2021, "Taming Transformers
for High-Resolution Image Synthesis", Sec. 3.1; Stable Diffusion's VAE, Rombach et al. 2022)
add a patch critic that judges local texture, with three details that keep it stable:

* a PatchGAN critic (Isola et al. 2017, "pix2pix", Sec. 3.2.2): one logit per overlapping patch,
  so it judges edges and cores, not the galaxy's overall shape (the latent's job);
* the hinge loss (Lim & Ye 2017; Miyato et al. 2018):
      L_D = 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]),   L_G = -E[D(x_hat)];
* the adaptive weight (Esser et al. 2021, eq. 7), which scales L_G so that its gradient at the
  decoder's last layer has a fixed ratio to the reconstruction term's:
      lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_G|| + delta).
  The sigma-VAE likelihood sums over pixels with a learned sigma, so its scale changes by orders
  of magnitude during training; a fixed weight (0.5 from the start) diverged on Galaxy Zoo 2.

The term starts only once reconstruction has converged (``TrainConfig.adv_start``). The critic
is not part of the model directory: sampling and serving never need it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Bounds of the adaptive weight (Esser et al. 2021 clamp it to [0, 1e4] with delta 1e-4).
ADAPTIVE_DELTA = 1e-4
ADAPTIVE_MAX = 1e4


def _groups(c: int) -> int:
    return math.gcd(c, 8)


class PatchCritic(nn.Module):
    """PatchGAN critic: (B, 3, S, S) in [0, 1] -> patch logits (B, 1, S/4 - 2, S/4 - 2).

    Two stride-2 convolutions and two stride-1 ones (Isola et al.'s 70x70 design with one
    stride-2 layer fewer): each logit sees a 34 px patch, half a 64 px galaxy crop. GroupNorm
    instead of BatchNorm so the critic behaves the same whatever the per-worker batch.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c1, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # (B, c1, S/2, S/2)
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # (B, c2, S/4, S/4)
            nn.GroupNorm(_groups(c2), c2), nn.LeakyReLU(0.2),
            nn.Conv2d(c2, c3, 4, stride=1, padding=1),  # (B, c3, S/4 - 1, S/4 - 1)
            nn.GroupNorm(_groups(c3), c3), nn.LeakyReLU(0.2),
            nn.Conv2d(c3, 1, 4, stride=1, padding=1),  # (B, 1, S/4 - 2, S/4 - 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


def critic_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the critic (a scalar): 0 once real patches score >= 1 and fakes <= -1."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial loss (a scalar): raise the critic's score of its images."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gen_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """lambda = ||d rec / d W_L|| / (||d gen / d W_L|| + delta), detached (Esser et al. 2021, eq. 7).

    ``last_layer`` is the weight of the decoder's last layer; both losses must still hold their
    graphs (they are kept for the backward pass that follows).
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gen = torch.autograd.grad(gen_loss, last_layer, retain_graph=True)[0]
    weight = g_rec.norm() / (g_gen.norm() + ADAPTIVE_DELTA)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach()
