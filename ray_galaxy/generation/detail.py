"""Residual detail model: the part of a galaxy the decoder's mean cannot predict.

A VAE decoder outputs E[x | z]: with a 64-d latent it cannot encode where each knot of a spiral
arm or each faint neighbour lies, so the mean is smooth (on Galaxy Zoo 2 at 64 px its
structure-band power is about 1 dex below the real images'; see docs/model.md, "Evaluation"). The
model's likelihood p(x | z) is what carries that variability, and the calibrated sigma-VAE
likelihood (one white sigma) is a poor description of it: real residuals are
non-stationary (large on the galaxy, small on the sky), spatially correlated (smooth blobs, not
pixel noise) and correlated across the three bands.

This module fits, after training and without touching the network (like the two-stage GMM
sampler, Dai & Wipf 2019), a Gaussian residual model with exactly those three properties:

    x = mu(z) + sigma(L) * (M @ v),   v = F^-1( sqrt(P(|k|)) * F(eps) ),   eps ~ N(0, I)

* sigma(L)^2 = c0 + c1 L + c2 L^2, with L the luminance of mu above its sky: sky noise plus a
  term that grows with the galaxy's light (non-negative least squares on squared residuals);
* M: the Cholesky factor of the 3x3 band correlation of the normalised residuals;
* P(|k|): the radially averaged power spectrum of the normalised, band-decorrelated residuals
  (orthonormal FFT, so P averages to the variance), i.e. stationary spatially correlated noise,
  kept from |k| = S/16 up (:func:`k_min`).

Fitting uses the training set's reconstructions (decoded posterior means), so the model learns
what the decoder misses on images it was trained on. Sampling with it gives the generative
model's samples instead of its means: same galaxies, with texture of the right amplitude,
scale, colour and place. It does not invent coherent structure (arms are still the decoder's).

One scalar is then set on what is actually sampled (:func:`calibrate_gain`): the gain on the
residual that gives decodes of the sampler's codes plus detail the training images'
structure-band power. Those decodes are smoother than the reconstructions the fit saw, and the
clip at 0 on a black sky eats part of every draw, so gain 1 leaves samples short of power
(on GZ2, kernels on the codes: -0.12..-0.14 dex, gain 1.26-1.27; the broad mixture
components: -0.19 dex, gain 1.37).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ray_galaxy.config import DETAIL_MODES
from ray_galaxy.images import frame_mask, luminance, power_deficit_dex, radial_power_spectrum, ring_index, sky_level


def k_min(size: int) -> int:
    """Lowest |k| (cycles per image) the detail noise has: S/16, the structure band's lower edge.

    Below it the reconstructions' residual is a misfit of the galaxy's overall shape (size,
    elongation), variability the latent code already carries; drawing it again as independent
    noise double counts it and shows as lopsided galaxies (asymmetry 0.38 -> 0.61 on GZ2)."""
    return max(1, size // 16)


def brightness(mean: np.ndarray) -> np.ndarray:
    """Luminance above the sky of mean images (N, S, S, 3) in [0, 1]: (N, S, S), >= 0."""
    return np.clip(mean - sky_level(mean), 0, None).mean(-1)


# What the residual model describes (TrainConfig.detail, jobs/fit_sampler.py --detail):
# "galaxy": everything the decoder's mean misses, its amplitude growing with the galaxy's light;
# "sky": only the sky's noise, the same everywhere (what a decoder that draws the galaxy itself
# sharply still lacks; docs/model.md, "Residual detail").
DETAIL_KINDS = tuple(m for m in DETAIL_MODES if m != "none")  # the settings, in one place: config
# "sky": the darkest share of each image's pixels (by the mean's brightness) is taken as sky.
SKY_SHARE = 0.3


# Images the residual model is fitted to (at most): its few parameters need no more.
DETAIL_IMAGES = 2000


def fit_detail(images: np.ndarray, means: np.ndarray, max_images: int = DETAIL_IMAGES,
               kind: str = "galaxy") -> dict[str, np.ndarray]:
    """Fit the residual model to real images and the decoder's reconstructions of them.

    ``images``: (N, S, S, 3) uint8 or floats in [0, 1]; ``means``: the decoded posterior means,
    same shape, floats in [0, 1]. Returns float64 arrays ``variance_coef`` (3,), ``mix`` (3, 3)
    and ``spectrum`` (S//2 * sqrt(2) + 2,) indexed by integer |k|. ``kind`` "sky" fits a
    constant variance and the spectrum to the sky's pixels only (:data:`DETAIL_KINDS`).
    """
    if kind not in DETAIL_KINDS:
        raise ValueError(f"detail kind must be one of {DETAIL_KINDS}, got {kind!r}")
    x = np.asarray(images[:max_images], np.float64)
    if x.max() > 1.5:
        x = x / 255.0
    mu = np.asarray(means[:max_images], np.float64)
    if x.shape != mu.shape or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images and means must both be (N, S, S, 3), got {x.shape} and {mu.shape}")
    r = x - mu
    lum = brightness(mu)
    if kind == "sky":
        sky = lum <= np.quantile(lum, SKY_SHARE, axis=(1, 2), keepdims=True)  # (N, S, S)
        coef = np.array([max(float((r ** 2).mean(-1)[sky].mean()), 1e-8), 0.0, 0.0])
        r = r * sky[..., None]  # the spectrum of the sky's residual alone (rescaled below)
    else:
        coef = variance_coef(lum, (r ** 2).mean(-1))
    sigma = np.sqrt(variance(lum, coef))[..., None]
    u = r / sigma  # (N, S, S, 3), about unit variance (on the sky, for "sky")
    cov = np.cov((u[sky] if kind == "sky" else u.reshape(-1, 3)).T)
    mix = np.linalg.cholesky(cov + 1e-9 * np.eye(3))
    v = np.einsum("ij,nhwj->nhwi", np.linalg.inv(mix), u)  # bands decorrelated
    s = x.shape[1]
    ring = ring_index(s, half=True)
    power = np.abs(np.fft.rfft2(v, axes=(1, 2), norm="ortho")) ** 2  # (N, S, S//2+1, 3)
    # rfft2 stores each non-self-conjugate bin once; weight them twice so the mean is the variance.
    w = np.full(ring.shape, 2.0)
    w[:, 0] = 1.0
    if s % 2 == 0:
        w[:, -1] = 1.0
    pm = power.mean(axis=(0, 3))
    if kind == "sky":  # masked to the sky: scale to the power of unit-variance noise everywhere
        pm = pm / max(float(sky.mean()), 1e-12)
    spectrum = np.bincount(ring.ravel(), (pm * w).ravel()) / np.bincount(ring.ravel(), w.ravel())
    spectrum[:k_min(s)] = 0.0
    return {"variance_coef": coef.astype(np.float64), "mix": mix, "spectrum": spectrum}


def variance_coef(lum: np.ndarray, r2: np.ndarray, bins: int = 40) -> np.ndarray:
    """(c0, c1, c2) of sigma^2(L) = c0 + c1 L + c2 L^2 from squared residuals ``r2`` at
    luminances ``lum`` (same shape): non-negative least squares on E[r^2 | L] in quantile bins of
    L, so that the sky's many pixels do not swamp the galaxy's.

    Degenerate inputs still fit: where the means have fewer than three distinct brightness
    levels (a barely trained decoder that draws one flat image: every quantile equal), only the
    constant term is fitted, the mean squared residual."""
    lv, r2 = lum.ravel(), r2.ravel()
    edges = np.unique(np.quantile(lv, np.linspace(0, 1, bins + 1)))
    if len(edges) < 4:
        return np.array([max(float(r2.mean()), 1e-8), 0.0, 0.0])
    idx = np.clip(np.searchsorted(edges, lv, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    keep = counts > 0
    lb = (np.bincount(idx, lv, len(edges) - 1)[keep] / counts[keep])
    vb = (np.bincount(idx, r2, len(edges) - 1)[keep] / counts[keep])
    # Imported here: only fitting needs SciPy's optimizers (~0.5 s of import that every process
    # drawing galaxies would otherwise pay).
    from scipy.optimize import nnls

    coef, _ = nnls(np.stack([np.ones_like(lb), lb, lb ** 2], 1), vb)
    coef[0] = max(coef[0], 1e-8)
    return coef


def variance(lum: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """sigma^2 of the residual at luminance-above-sky ``lum``."""
    return coef[0] + coef[1] * lum + coef[2] * lum ** 2


def _residual(mu: np.ndarray, detail: Mapping[str, torch.Tensor | np.ndarray], seed: int,
              offset: int = 0) -> np.ndarray:
    """One draw of sigma(L) * (M @ v) around means ``mu`` (B, S, S, 3) float64, by seed."""
    b, s = mu.shape[0], mu.shape[1]
    coef = np.asarray(detail["variance_coef"], np.float64)
    mix = np.asarray(detail["mix"], np.float64)
    spectrum = np.asarray(detail["spectrum"], np.float64)
    ring = ring_index(s, half=True)
    if ring.max() >= len(spectrum):
        raise ValueError(f"detail model was fitted at another image size (spectrum of {len(spectrum)} "
                         f"rings, images of {s} px)")
    g = np.random.default_rng(int(seed))
    eps = g.standard_normal((offset + b, s, s, 3))[offset:]
    v = np.fft.irfft2(np.fft.rfft2(eps, axes=(1, 2), norm="ortho") * np.sqrt(spectrum[ring])[None, :, :, None],
                      s=(s, s), axes=(1, 2), norm="ortho")
    u = np.einsum("ij,nhwj->nhwi", mix, v)
    return np.sqrt(variance(brightness(mu), coef))[..., None] * u


def add_detail(means: torch.Tensor, detail: Mapping[str, torch.Tensor | np.ndarray], seed: int = 0,
               temperature: float = 1.0, offset: int = 0) -> torch.Tensor:
    """Draw x ~ p(x | z) given decoded means (B, 3, S, S) in [0, 1]; same seed, same images.

    The noise is drawn on the CPU in float64 from ``seed`` (independent of batch composition
    and device); the result is clipped to [0, 1]. ``temperature`` scales the residual.
    ``offset``: these are rows offset.. of a larger draw from the same seed (Serve decodes a
    request in chunks), so the noise of the rows before is drawn and dropped.
    """
    mu = means.detach().double().cpu().permute(0, 2, 3, 1).numpy()  # (B, S, S, 3)
    x = mu + temperature * _residual(mu, detail, seed, offset)
    return torch.from_numpy(np.clip(x, 0, 1)).permute(0, 3, 1, 2).float().to(means.device)


def draw_differentiable(means: torch.Tensor, detail: Mapping[str, torch.Tensor],
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """x ~ p(x | z) around decoded means (B, 3, S, S) in [0, 1], differentiable in the means: the
    same residual model as :func:`add_detail`, in torch on the means' device, for training (the
    adversarial critic judges what users get, the means with their detail). Not byte-reproducible
    across batchings: sampling uses :func:`add_detail`."""
    b, _, s, _ = means.shape
    dev, dt = means.device, means.dtype
    coef, mix = detail["variance_coef"].to(dev, dt), detail["mix"].to(dev, dt)
    ring = torch.from_numpy(ring_index(s, half=True)).to(dev)
    amplitude = detail["spectrum"].to(dev, dt).clamp_min(0).sqrt()[ring]  # (S, S//2 + 1)
    eps = torch.randn(b, 3, s, s, generator=generator).to(dev, dt)
    v = torch.fft.irfft2(torch.fft.rfft2(eps, norm="ortho") * amplitude, s=(s, s), norm="ortho")
    u = torch.einsum("ij,bjhw->bihw", mix, v)
    frame = torch.from_numpy(frame_mask(s)).to(dev)
    sky = means[:, :, frame].median(-1).values[:, :, None, None]  # (B, 3, 1, 1), as sky_level
    lum = (means - sky).clamp_min(0).mean(1, keepdim=True)  # as brightness()
    sigma = (coef[0] + coef[1] * lum + coef[2] * lum ** 2).clamp_min(0).sqrt()
    return (means + sigma * u).clamp(0, 1)


GAIN_BOUNDS = (0.5, 2.0)


def calibrate_gain(means: np.ndarray, detail: Mapping[str, torch.Tensor | np.ndarray], real: np.ndarray,
                   seed: int = 0, bounds: tuple[float, float] = GAIN_BOUNDS, tol: float = 1e-3
                   ) -> dict[str, float]:
    """The gain on the residual that gives samples the real images' structure-band power.

    ``means``: decoded means of the sampler's own codes, (N, S, S, 3) floats in [0, 1];
    ``real``: the training images, (M, S, S, 3). Why a gain at all: the fit is made on
    reconstructions, but what is sampled are decodes of the sampler's codes, which can be
    smoother (on GZ2 the mixture components' were -0.78 against -0.62 dex below the real power
    in the structure band), and the clip at 0 on a black sky removes part of every draw; with
    gain 1 the samples of the GZ2 model lacked 0.19 dex (0.12-0.14 with kernels on the codes).
    The power of clip(mu + g r) rises monotonically with g, so this is a bisection on log g,
    with one noise draw reused throughout. The gain is clamped to ``bounds``: far outside them
    the residual model, not its amplitude, is wrong.
    Returns ``gain`` and the structure-band power deficit (dex) at gain 1 and at the gain.
    """
    mu = np.asarray(means, np.float64)
    if mu.ndim != 4 or mu.shape[-1] != 3 or np.shape(real)[1:] != mu.shape[1:]:
        raise ValueError(f"means and real images must be (N, S, S, 3) of one size, got {mu.shape} "
                         f"and {np.shape(real)}")
    s = mu.shape[1]
    k, p_real = radial_power_spectrum(luminance(real))
    r = _residual(mu, detail, seed)

    def deficit(g: float) -> float:
        _, p = radial_power_spectrum(np.clip(mu + g * r, 0, 1).mean(-1))
        return power_deficit_dex(k, p, p_real, s)

    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    d_lo, d_hi = deficit(bounds[0]), deficit(bounds[1])
    if d_lo >= 0:
        gain = bounds[0]
    elif d_hi <= 0:
        gain = bounds[1]
    else:
        while hi - lo > tol:
            mid = (lo + hi) / 2
            if deficit(float(np.exp(mid))) < 0:
                lo = mid
            else:
                hi = mid
        gain = float(np.exp((lo + hi) / 2))
    return {"gain": gain, "deficit_dex_at_1": deficit(1.0), "deficit_dex": deficit(gain)}
