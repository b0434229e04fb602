"""The adversarial critic: a training-only network that teaches the decoder what galaxies look like.

A VAE decoder trained on a pixel likelihood outputs E[x | z], which blurs whatever the latent
code does not pin down. Production autoencoders (VQGAN, Esser et al. 2021, "Taming Transformers
for High-Resolution Image Synthesis", Sec. 3.1; Stable Diffusion's VAE, Rombach et al. 2022)
add a critic, fine-tuning a converged likelihood model against it, with details that keep it
stable:

* the hinge loss (Lim & Ye 2017; Miyato et al. 2018):
      L_D = 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]),   L_G = -E[D(x_hat)];
* the adaptive weight (Esser et al. 2021, eq. 7), which scales L_G so that its gradient at the
  decoder's last layer has a fixed ratio to the reconstruction term's:
      lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_G|| + delta).
  The sigma-VAE likelihood sums over pixels with a learned sigma, so its scale is orders of
  magnitude from VQGAN's (see ADAPTIVE_MAX).

On a few thousand images a critic wins outright: it memorises the training set, its loss goes to
0 and the decoder learns to fool it with stripes (docs/experiments.md). The small-data cures
here, each a setting of the fine-tuning phase (``TrainConfig.finetune_epochs``,
:mod:`ray_galaxy.training.adversary`):

* differentiable augmentation of real and generated images alike before the critic
  (DiffAugment, Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
  Training"): :func:`diff_augment`, policies ``translation``, ``cutout`` and ``color``;
* the R1 gradient penalty on real images (Mescheder et al. 2018, "Which Training Methods for
  GANs do actually Converge?"), lazily every few steps as in StyleGAN2 (Karras et al. 2020):
  :func:`r1_penalty`;
* a small critic (:class:`Critic`, ``TrainConfig.critic_width``).

Which critic. A PatchGAN critic (Isola et al. 2017; a stride-2 4x4 first layer, GroupNorm or
spectral norm) could not tell the likelihood model's reconstructions from real Galaxy Zoo 2
images in 300 steps without augmentation (hinge loss stuck at 1.0; with spectral norm 0.9),
while the realism test's CNN tells them apart at 0.998: the difference is pixel-scale texture
(the real sky's noise, sharp cores) that a strided first layer aliases away and that, at the
faint amplitude of a galaxy image's sky, only a normalised network picks up quickly. So one
network serves both: :class:`Critic`. Its BatchNorm sees real and generated images in the same
batch in every call (critic step, R1 and the decoder's step alike): with all-real and all-fake
batches, batch statistics alone give the class away and the critic learns nothing it can use
(measured: train loss 0, held-out accuracy at chance).

The critic is not part of the model directory: sampling and serving never need it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_galaxy.images import augment_d4


# Bounds of the adaptive weight. Esser et al. 2021 clamp it to [0, 1e4] (delta 1e-4) for a
# reconstruction loss that is a per-pixel mean; ours is the sigma-VAE's negative log-likelihood
# summed over 3 S^2 pixels with a learned sigma of ~0.03, whose gradient is orders of magnitude
# larger. At 1e4 the weight sat at its clamp on Galaxy Zoo 2 and the critic changed nothing (PSNR
# and pictures as before after an epoch), so the bound is far higher: it only guards against a
# critic whose gradient vanishes (by construction the weighted term's gradient at the last layer
# is adv_weight times the reconstruction's, whatever lambda is).
ADAPTIVE_DELTA = 1e-4
ADAPTIVE_MAX = 1e9


class Critic(nn.Module):
    """(B, 3, S, S) in [0, 1] -> one logit per image (B,): real rather than generated (the
    realism test trains the same network with the opposite sign).

    A full-resolution 3x3 convolution, then four stride-2 ones with BatchNorm (S -> S/16), then
    the mean and the maximum over positions: the mean judges texture everywhere (grain, sky
    noise), the maximum the most telling patch (a core, a knot). The first layer keeps full
    resolution because pixel-scale texture is what tells generated images apart, and a stride
    there would alias it away. BatchNorm because without it (or with GroupNorm) training sat at
    chance for hundreds of steps before it learned anything, even on blurred copies of real
    images; every batch must hold real and generated images alike (module docstring).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [width, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(chans, chans[1:]):  # (B, c_in, s, s) -> (B, c_out, s/2, s/2)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * chans[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One logit per image (B,) for images (B, 3, S, S) in [0, 1]; positive means real."""
        h = self.features(x * 2 - 1)  # (B, 4w, S/16, S/16)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)  # (B, 8w)
        return self.head(pooled)[:, 0]


def critic_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the critic (a scalar): 0 once real images score >= 1 and generated ones <= -1."""
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


def accuracy(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> tuple[float, float]:
    """The critic's accuracy on real and on generated images: the share of logits on the right
    side of 0."""
    return float((logits_real > 0).float().mean()), float((logits_fake < 0).float().mean())


def r1_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E ||grad_x D(x)||^2 over real images x in [0, 1] (Mescheder et al. 2018, eq. 9, without
    gamma / 2): a critic that is flat around the real data cannot push the generator past it.
    The real images go through the critic in one batch with ``fake`` (BatchNorm's statistics as
    in every other call); only their logits' gradient counts."""
    x = torch.cat([real.detach(), fake.detach()]).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x)[: len(real)].sum(), x, create_graph=True)
    return grad[: len(real)].pow(2).flatten(1).sum(1).mean()


def diff_augment(x: torch.Tensor, policy: tuple[str, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020): random, differentiable changes of (B, 3, S, S) images in
    [0, 1], each image its own draw, applied to real and generated images alike before the critic.

    * ``color``: brightness +-0.1 (of the sky too: the critic may not key on the sky level),
      saturation x[0.5, 1.5] and contrast x[0.75, 1.25] around the image's mean;
    * ``translation``: a shift of up to 1/8 of the size, the uncovered rim filled with the
      image's own edge rows (sky, not black);
    * ``cutout``: a square of half the size set to the image's sky level (the median of its
      border), anywhere in the image;
    * ``d4``: a random flip or quarter turn (a galaxy has no up; the realism test's classifier
      sees its images so too). It changes no pixel value, so unlike ``color`` it hides none of the
      faint texture (sky noise, grain) that tells generated galaxies apart.
    Written here because DiffAugment ships as research code, not as a package.
    """
    b, _, s, _ = x.shape

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(x.device, x.dtype)

    if "color" in policy:
        x = x + (rand(b, 1, 1, 1) - 0.5) * 0.2
        mean = x.mean(1, keepdim=True)
        x = (x - mean) * (rand(b, 1, 1, 1) + 0.5) + mean
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * (rand(b, 1, 1, 1) * 0.5 + 0.75) + mean
    if "translation" in policy:
        shift = s // 8
        pad = torch.nn.functional.pad(x, (shift,) * 4, mode="replicate")
        dy, dx = (rand(b) * (2 * shift + 1)).long(), (rand(b) * (2 * shift + 1)).long()
        rows = (dy[:, None] + torch.arange(s, device=x.device)[None])  # (B, S)
        cols = (dx[:, None] + torch.arange(s, device=x.device)[None])
        x = pad[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(3, device=x.device)[None, :, None, None],
                rows[:, None, :, None], cols[:, None, None, :]]
    if "d4" in policy:
        x = augment_d4(x, generator)
    if "cutout" in policy:
        half = s // 2
        cy, cx = (rand(b) * (s - half + 1)).long(), (rand(b) * (s - half + 1)).long()
        grid = torch.arange(s, device=x.device)
        inside_y = (grid[None] >= cy[:, None]) & (grid[None] < cy[:, None] + half)  # (B, S)
        inside_x = (grid[None] >= cx[:, None]) & (grid[None] < cx[:, None] + half)
        mask = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (B, 1, S, S)
        edge = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], 2)  # (B, 3, 4S)
        sky = edge.median(2).values[:, :, None, None]
        x = torch.where(mask, sky, x)
    return x
