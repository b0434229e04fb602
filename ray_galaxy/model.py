"""Convolutional VAE for galaxy images, built from one :class:`ModelConfig`.

Maths (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"; as in pytorch/examples/vae):

    q(z|x) = N(mu(x), diag(exp(logvar(x))))           encoder
    z      = mu + exp(0.5 * logvar) * eps, eps~N(0,I)  reparameterization (Appendix B)
    KL(q || N(0, I)) = 0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)
    loss   = -log p(x|z) + beta * KL                  (negative ELBO when beta = 1)

Likelihoods, summed over pixels:
  * ``bce``: the original design's cross-entropy on pixel values in [0, 1].
  * ``gaussian``: N(x; mean, sigma^2) with one learned sigma shared by all pixels: the
    calibrated decoder of Rybkin, Daniilidis & Levine 2021 ("Simple and Effective VAE
    Training with Calibrated Decoders", sigma-VAE). Learning sigma balances the two terms
    automatically instead of an arbitrary fixed weight.

Images are float tensors in [0, 1], shape (B, 3, S, S). The decoder ends in tanh; its output
t is mapped to pixel range as (t + 1) / 2, which equals sigmoid(2 * a) for the pre-activation
a, so the cross-entropy is computed stably from logits 2 * a.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ray_galaxy.config import ModelConfig

LOG_2PI = math.log(2 * math.pi)
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# Lower bound on the learned decoder log-sigma: keeps the Gaussian NLL finite if a
# reconstruction becomes near perfect on tiny data (sigma-VAE uses the same kind of clip).
MIN_LOG_SIGMA = -6.0
SIGMA_MOMENTUM = 0.9


def _groups(c: int) -> int:
    return math.gcd(c, 8)


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x)))))).

    The branch's last conv starts at zero, so each block starts as the identity and a network
    with blocks starts as the one without (Goyal et al. 2017, "zero gamma"; Zhang et al. 2019,
    Fixup). It does not make blocks stable at the default lr 2e-3 on Galaxy Zoo 2 (train them at
    1e-3; docs/experiments.md, "Three decoders on the same budget").
    """

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
            nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


DECODE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def decode_dtype(device: torch.device | str) -> torch.dtype:
    """The precision :meth:`ConvVAE.decode` runs in by default: float64 on a CPU (byte-reproducible
    whatever the batching), float32 on an accelerator (float64 is a small fraction of its rate)."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


class ConvVAE(nn.Module):
    """Fully convolutional VAE: stride-2 encoder, upsample+conv decoder, Gaussian latent."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.channels
        n = len(ch)
        self.bottom = config.image_size >> n  # spatial size after the encoder
        act = nn.SiLU if config.blocks_per_stage else nn.LeakyReLU

        enc: list[nn.Module] = []
        c_in = 3
        for c in ch:  # (B, c_in, s, s) -> (B, c, s/2, s/2)
            enc += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), act()]
            enc += [ResBlock(c) for _ in range(config.blocks_per_stage)]
            c_in = c
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        flat = ch[-1] * self.bottom * self.bottom
        self.fc_mu = nn.Linear(flat, config.latent_dim)
        self.fc_logvar = nn.Linear(flat, config.latent_dim)

        self.fc_dec = nn.Linear(config.latent_dim, flat)
        dec: list[nn.Module] = []
        rev = list(reversed(ch))
        for i, c in enumerate(rev):  # (B, c, s, s) -> (B, c_next, 2s, 2s)
            c_next = rev[i + 1] if i + 1 < n else 3
            dec += [ResBlock(c) for _ in range(config.blocks_per_stage)]
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c_next, 3, padding=1)]
            if i + 1 < n:
                dec.append(act())
        self.decoder = nn.Sequential(*dec)
        # Shared decoder log-sigma of the Gaussian likelihood. It is learned by its closed-form
        # maximum-likelihood update rather than by SGD (Rybkin et al. 2021, Sec. 4, "optimal
        # sigma"): SGD on it is so slow that the KL term wins first and the posterior collapses.
        # A buffer, so DDP broadcasts rank 0's value instead of expecting a gradient.
        self.register_buffer("log_sigma", torch.zeros(()))

    # ------------------------------------------------------------------ parts
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> mu, logvar, each (B, latent_dim)."""
        h = self.encoder(x * 2 - 1)
        # Clamped as in diffusers' DiagonalGaussianDistribution: an encoder that blows up on one
        # image must not give exp(logvar) = inf (an infinite KL, NaN gradients for the whole
        # batch), as one GZ2 validation image did at KL weight 0.2. Inside the range, as for
        # every trained model here, nothing changes.
        return self.fc_mu(h), self.fc_logvar(h).clamp(LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mu + sigma * eps with sigma = exp(0.5 * logvar) (not sigma^2 * eps)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> pre-tanh activations a, (B, 3, S, S)."""
        h = self.fc_dec(z).view(-1, self.config.channels[-1], self.bottom, self.bottom)
        return self.decoder(h)

    def last_layer(self) -> nn.Parameter:
        """The weight of the decoder's last convolution (the adversarial term's adaptive weight
        compares gradients there)."""
        return self.decoder[-1].weight

    def forward(self, x: torch.Tensor, z_extra: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Returns (pre-tanh decoder output, mu, logvar) for a sampled z; with ``z_extra`` (k, D)
        also the pre-tanh decodes of those codes, (k, 3, S, S), from the same decoder pass (under
        DDP a second call of the decoder alone would bypass the wrapper's gradient sync)."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        if z_extra is None:
            return self.decode_logits(z), mu, logvar
        a = self.decode_logits(torch.cat([z, z_extra.to(z)]))
        return a[: len(x)], mu, logvar, a[len(x):]

    def encoder_modules(self) -> list[nn.Module]:
        """The modules that map an image to its code (frozen during adversarial fine-tuning)."""
        return [self.encoder, self.fc_mu, self.fc_logvar]

    def freeze_encoder(self) -> None:
        """Stop training the encoder: the codes of the training images, and a sampler fitted to
        them, stay valid while the decoder is fine-tuned."""
        for m in self.encoder_modules():
            m.requires_grad_(False)

    # ------------------------------------------------------------------ loss
    def recon_nll(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per image (B,), summed over pixels; ``a`` is the pre-tanh output."""
        a = a.float()
        if self.config.likelihood == "bce":
            nll = F.binary_cross_entropy_with_logits(2 * a, x, reduction="none")
        else:
            mean = (torch.tanh(a) + 1) / 2
            if self.training and torch.is_grad_enabled():
                with torch.no_grad():  # argmax_sigma of the batch likelihood: sqrt(mean sq. error)
                    log_sigma = 0.5 * torch.log((x - mean).pow(2).mean().clamp_min(1e-12))
                    # The stored value (used at evaluation) is a running average over batches.
                    self.log_sigma.mul_(SIGMA_MOMENTUM).add_((1 - SIGMA_MOMENTUM) * log_sigma)
                log_sigma = log_sigma.clamp(min=MIN_LOG_SIGMA)
            else:
                log_sigma = self.log_sigma.clamp(min=MIN_LOG_SIGMA)
            nll = 0.5 * ((x - mean) / log_sigma.exp()) ** 2 + log_sigma + 0.5 * LOG_2PI
        return nll.flatten(1).sum(1)

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Closed-form KL(N(mu, exp(logvar)) || N(0, I)) per image (B,)."""
        mu, logvar = mu.float(), logvar.float()
        return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)

    def loss(self, x: torch.Tensor, kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Per-batch means of loss = recon + kl_weight * kl, and of each term.

        Also returns per-image vectors ``recon_per_image`` / ``kl_per_image`` and the
        pre-tanh output ``a`` so callers can compute further statistics without a second pass.
        """
        a, mu, logvar = self(x)
        recon = self.recon_nll(a, x)
        kl = self.kl(mu, logvar)
        return {
            "loss": (recon + kl_weight * kl).mean(),
            "recon": recon.mean(),
            "kl": kl.mean(),
            "recon_per_image": recon.detach(),
            "kl_per_image": kl.detach(),
            "mu": mu.detach(),
        }

    def bits_per_dim(self, nelbo: torch.Tensor) -> torch.Tensor:
        """Negative ELBO (nats per image) in bits per dimension.

        For the Gaussian likelihood on x = k / 255 the discrete likelihood of pixel value k
        is approximately density * (1 / 255), so log2(255) bits per dimension are added.
        """
        d = 3 * self.config.image_size ** 2
        bpd = nelbo / (d * math.log(2))
        if self.config.likelihood == "gaussian":
            bpd = bpd + math.log2(255)
        return bpd

    # ------------------------------------------------------------------ inference
    def _device(self) -> torch.device:
        return self.fc_mu.weight.device

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Latent codes (B, latent_dim) -> mean images (B, 3, S, S) in [0, 1].

        ``dtype`` None is :func:`decode_dtype` of the model's device. On a CPU that is float64:
        float32 conv kernels round differently depending on batch size and threads, which flips
        the odd 8-bit pixel, while in float64 the same latent gives the same bytes however
        requests are batched (samples and served PNGs are byte-reproducible). On a GPU float64
        runs at a small fraction of float32's rate, so there it is float32 (docs/model.md,
        "Decoding precision").
        """
        dtype = dtype or decode_dtype(self._device())
        fc, dec = self._decoder_in(dtype)
        h = fc(z.to(self._device(), dtype)).view(-1, self.config.channels[-1], self.bottom, self.bottom)
        return ((torch.tanh(dec(h).float()) + 1) / 2).float()

    def _decoder_in(self, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
        """A copy of the decoder in ``dtype``, rebuilt only when a weight has changed since."""
        params = list(self.fc_dec.parameters()) + list(self.decoder.parameters())
        key = (str(self._device()), str(dtype)) + tuple((id(p), p._version) for p in params)
        cached = getattr(self, "_decoder_cache", None)
        if cached is None or cached[0] != key:
            fc, dec = copy.deepcopy(self.fc_dec).to(dtype), copy.deepcopy(self.decoder).to(dtype)
            # Stored outside nn.Module bookkeeping: not a submodule, not in the state dict.
            object.__setattr__(self, "_decoder_cache", (key, fc, dec))
            cached = self._decoder_cache
        return cached[1], cached[2]

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean: (B, 3, S, S) in [0, 1] -> (B, 3, S, S) in [0, 1]."""
        mu, _ = self.encode(x.to(self._device()).float())
        return self.decode(mu)


def build_model(config: ModelConfig) -> ConvVAE:
    """Construct a :class:`ConvVAE` from its config."""
    return ConvVAE(config)


def to_uint8(images: torch.Tensor) -> "torch.Tensor":
    """(B, 3, S, S) floats in [0, 1] -> (B, S, S, 3) uint8 on the CPU."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
