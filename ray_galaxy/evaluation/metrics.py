"""The numbers of an evaluation (docs/model.md, section "Evaluation", gives definitions and caveats).

* **likelihood**: the negative ELBO with KL weight 1 and the importance-weighted bound
  (IWAE, Burda, Grosse & Salakhutdinov 2016) with K samples from q(z|x), both in bits/dim
  (:meth:`ConvVAE.bits_per_dim`). IWAE_K >= ELBO, so its bits/dim are lower (tighter).
* **reconstruction**: PSNR and SSIM (``skimage.metrics.structural_similarity``) of the
  posterior-mean reconstructions.
* **morphology**: CAS, Gini/M20, size, shape and colour (:mod:`.morphology`) of generated vs
  held-out galaxies, as normalised 1-D Wasserstein distances with a noise floor.
* **sharpness**: radially averaged power spectra; the power deficit in the structure band; and
  per image the noise-corrected high-pass power in the galaxy's segment (:mod:`.sharpness`).
* **memorisation**: median nearest-neighbour distance generated -> training set, divided by
  the same for held-out -> training set.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from skimage.metrics import structural_similarity

from ray_galaxy import morphology
from ray_galaxy.evaluation import distances
from ray_galaxy.images import (D4, luminance, orient, power_deficit_dex, radial_power_spectrum,
                               structure_band)
from ray_galaxy.model import LOG_2PI, ConvVAE, to_uint8

# Every metric metrics.json carries (dotted paths); tests check each is present.
METRIC_KEYS = (
    "likelihood.elbo_bpd", "likelihood.iwae_bpd", "reconstruction.psnr", "reconstruction.ssim",
    *(f"morphology.distance.{s}" for s in morphology.STATS),
    *(f"morphology.floor.{s}" for s in morphology.STATS),
    "morphology.mean_distance", "morphology.mean_floor",
    "sharpness.power_deficit_dex", "sharpness.floor_dex", "sharpness.reconstruction_dex",
    "sharpness.highpass.median.real", "sharpness.highpass.median.generated",
    "sharpness.highpass.distance.generated", "sharpness.highpass.floor",
    "memorisation.ratio", "memorisation.ratio_vs_reconstructions",
    "realism.generated.accuracy", "realism.generated.spread", "realism.means.accuracy", "realism.floor.accuracy",
)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


# --------------------------------------------------------------------------- likelihood


def _batch_bounds(model: ConvVAE, x: torch.Tensor, k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Per image of one batch: mean -log p(x|z) over k draws, KL, the k log weights, KL per dim."""
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    w = torch.empty(x.shape[0], k, dtype=torch.float64)
    recon = torch.zeros(x.shape[0], dtype=torch.float64)
    for j in range(k):
        eps = torch.randn(mu.shape, generator=g)
        z = mu + std * eps
        log_px = -model.recon_nll(model.decode_logits(z), x).double()
        log_pz = -0.5 * (z.double() ** 2 + LOG_2PI).sum(1)
        log_qz = -0.5 * (eps.double() ** 2 + LOG_2PI + logvar.double()).sum(1)
        w[:, j] = log_px + log_pz - log_qz
        recon -= log_px
    return {"recon": recon / k, "kl": model.kl(mu, logvar).double(), "log_w": w,
            "kl_dims": (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).double()}


@torch.no_grad()
def likelihood_bounds(model: ConvVAE, images: np.ndarray, k: int = 32, seed: int = 0,
                      batch_size: int = 64) -> dict[str, Any]:
    """Negative ELBO (KL weight 1) and the IWAE bound with ``k`` samples, in nats and bits/dim.

    For each image, z_j = mu + sigma * eps_j (j = 1..k) and
    w_j = log p(x|z_j) + log N(z_j; 0, I) - log N(z_j; mu, sigma^2);
    -ELBO = mean_j(-log p(x|z_j)) + KL(q || p) (closed form), and
    -IWAE = -(logsumexp_j w_j - log k), which is never looser than the ELBO in expectation.
    """
    model.eval()
    g = torch.Generator().manual_seed(int(seed))
    parts = [_batch_bounds(model, to_tensor(images[i:i + batch_size]), k, g)
             for i in range(0, len(images), batch_size)]
    recon, kl = torch.cat([p["recon"] for p in parts]), torch.cat([p["kl"] for p in parts])
    nelbo = recon + kl
    niwae = torch.cat([-(torch.logsumexp(p["log_w"], 1) - math.log(k)) for p in parts])
    return {
        "elbo_bpd": float(model.bits_per_dim(nelbo.mean())),
        "iwae_bpd": float(model.bits_per_dim(niwae.mean())),
        "nelbo_nats": float(nelbo.mean()),
        "niwae_nats": float(niwae.mean()),
        "recon_nats": float(recon.mean()),
        "kl_nats": float(kl.mean()),
        "kl_per_dim": torch.cat([p["kl_dims"] for p in parts]).mean(0).tolist(),
        "iwae_k": k,
        "images": len(images),
    }


# --------------------------------------------------------------------------- reconstruction


@torch.no_grad()
def reconstruct(model: ConvVAE, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Posterior-mean reconstructions as (N, S, S, 3) uint8 (what a PNG of them would hold)."""
    out = [to_uint8(model.reconstruct(to_tensor(images[i:i + batch_size]))).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def reconstruction_scores(real: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    """Mean PSNR (dB, data range 1) and mean SSIM (skimage, 7x7 window, over RGB) per image."""
    a, b = real.astype(np.float64) / 255, recon.astype(np.float64) / 255
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1).clip(1e-10)
    ssim = [structural_similarity(x, y, channel_axis=-1, data_range=1.0) for x, y in zip(a, b)]
    return {"psnr": float(np.mean(10 * np.log10(1 / mse))), "ssim": float(np.mean(ssim))}


# --------------------------------------------------------------------------- morphology and sharpness


def _mean_std(v: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(v).any()
    return {"mean": float(np.nanmean(v)) if ok else math.nan, "std": float(np.nanstd(v)) if ok else math.nan}


def morphology_scores(m_real: dict[str, np.ndarray], m_gen: dict[str, np.ndarray], seed: int = 0,
                      m_means: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Distances real vs generated per statistic, their noise floors, means, summaries and the
    fraction of images whose measurement failed (:func:`morphology.measure_all` outputs).

    With ``m_means`` (the same codes' decoder means), their distances to real sit next to the
    samples' (``distance_means``, ``mean_distance_means``) and their summary with the others.
    """
    table = distances.wasserstein_table(m_real, m_gen, seed)
    dist = {k: v["distance"] for k, v in table.items()}
    floor = {k: v["floor"] for k, v in table.items()}
    sets = (("real", m_real), ("generated", m_gen)) + ((("means", m_means),) if m_means is not None else ())
    out = {"distance": dist, "floor": floor,
           "mean_distance": distances.mean_distance(dist.values()),
           "mean_floor": distances.mean_distance(floor.values()),
           "summary": {name: {k: _mean_std(v) for k, v in vals.items()} for name, vals in sets},
           "failed_fraction": {name: float(np.mean(~np.isfinite(vals["concentration"]))) for name, vals in sets}}
    if m_means is not None:
        means = {k: v["distance"] for k, v in distances.wasserstein_table(m_real, m_means, seed).items()}
        out["distance_means"] = means
        out["mean_distance_means"] = distances.mean_distance(means.values())
    return out


def power_spectrum(images: np.ndarray) -> np.ndarray:
    """The mean radially averaged power spectrum of the luminance of (N, S, S, 3) images."""
    return radial_power_spectrum(luminance(images))[1]


def sharpness_scores(real: np.ndarray, generated: np.ndarray, recon: np.ndarray, seed: int = 0
                     ) -> dict[str, Any]:
    """Structure-band power of generated images and of reconstructions vs the real ones, and the
    floor: the same between two random halves of the real set."""
    size = real.shape[1]
    k, p_real = radial_power_spectrum(luminance(real))
    p_gen, p_rec = power_spectrum(generated), power_spectrum(recon)  # recon: the decoder's own blur
    halves = np.random.default_rng(seed).permutation(len(real))
    p_h1 = power_spectrum(real[halves[: len(real) // 2]])
    p_h2 = power_spectrum(real[halves[len(real) // 2:]])
    return {"power_deficit_dex": power_deficit_dex(k, p_gen, p_real, size),
            "floor_dex": abs(power_deficit_dex(k, p_h1, p_h2, size)),
            "reconstruction_dex": power_deficit_dex(k, p_rec, p_real, size),
            "band_cycles_per_image": list(structure_band(size)), "k": k.tolist(),
            "power_real": p_real.tolist(), "power_generated": p_gen.tolist()}


# --------------------------------------------------------------------------- memorisation


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray, orientations: int = 8,
                       chunk: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distance, reference index, orientation) of each query's nearest reference image.

    Pixel L2 on [0, 1] values over all 3 S^2 numbers; every reference image is tried in the
    first ``orientations`` elements of D4 (training augmented with all 8).
    """
    q = torch.from_numpy(queries.reshape(len(queries), -1)).float() / 255
    q_sq = (q.double() ** 2).sum(1)
    best = torch.full((len(q),), math.inf, dtype=torch.float64)
    idx = torch.zeros(len(q), dtype=torch.long)
    ori = torch.zeros(len(q), dtype=torch.long)
    for o in range(orientations):
        ref_all = orient(reference, o).reshape(len(reference), -1)
        for start in range(0, len(reference), chunk):
            ref = torch.from_numpy(ref_all[start:start + chunk]).float() / 255
            d2 = q_sq[:, None] + (ref.double() ** 2).sum(1)[None] - 2 * (q @ ref.T).double()
            m, j = d2.min(1)
            better = m < best
            best[better], idx[better], ori[better] = m[better], j[better] + start, o
    return best.clamp_min(0).sqrt().numpy(), idx.numpy(), ori.numpy()


def memorisation(generated: np.ndarray, held_out: np.ndarray, train: np.ndarray,
                 reconstructions: np.ndarray | None = None) -> dict[str, Any]:
    """Median NN distance generated -> train over held-out -> train (train in all 8 orientations).

    About 1: samples are as far from the training set as new real galaxies are. Well below 1:
    samples copy training images, *or* are blurry: L2 puts smooth averages close to many
    images. ``ratio_vs_reconstructions`` divides by the median distance of the held-out
    images' reconstructions instead, images exactly as blurry as the decoder makes them but
    certainly not copies, so it separates copying from blur. Well above 1: samples look unlike
    any training galaxy (e.g. prior samples from holes of the aggregate posterior).
    """
    dg, ig, og = nearest_neighbours(generated, train)
    dh, _, _ = nearest_neighbours(held_out, train)
    out = {"ratio": float(np.median(dg) / np.median(dh)), "median_nn_generated": float(np.median(dg)),
           "median_nn_held_out": float(np.median(dh)), "train_images": int(len(train)),
           "orientations": len(D4), "nn_index": ig.tolist(), "nn_orientation": og.tolist()}
    if reconstructions is not None:
        dr, _, _ = nearest_neighbours(reconstructions, train)
        out["median_nn_reconstructions"] = float(np.median(dr))
        out["ratio_vs_reconstructions"] = float(np.median(dg) / np.median(dr))
    return out


def nearest_training_images(train: np.ndarray, mem: dict[str, Any], n: int) -> np.ndarray:
    """The first ``n`` generated images' nearest training images, in the matching orientation."""
    return np.stack([orient(train[mem["nn_index"][i]][None], mem["nn_orientation"][i])[0] for i in range(n)])


# --------------------------------------------------------------------------- metrics.json


def clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def get_metric(metrics: dict[str, Any], dotted: str) -> Any:
    """metrics['a']['b'] for 'a.b'."""
    v: Any = metrics
    for part in dotted.split("."):
        v = v[part]
    return v
