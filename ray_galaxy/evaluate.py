"""Evaluation of a trained model directory on held-out galaxies (``jobs/evaluate.py``).

Writes ``<out>/report.md``, ``<out>/metrics.json`` and the PNG figures the report links.
Everything runs in this process on the CPU (no Ray): images are read and decoded directly.

Metrics (README.md, section "Evaluate", gives the definitions and caveats):

* **likelihood**: the negative ELBO with KL weight 1 and the importance-weighted bound
  (IWAE, Burda, Grosse & Salakhutdinov 2016) with K samples from q(z|x), both in bits/dim
  (:meth:`ConvVAE.bits_per_dim`). IWAE_K >= ELBO, so its bits/dim are lower (tighter).
* **reconstruction**: PSNR and SSIM (``skimage.metrics.structural_similarity``) of the
  posterior-mean reconstructions.
* **morphology**: CAS, Gini/M20, size, shape and colour (:mod:`ray_galaxy.morphology`) of
  generated vs held-out galaxies, as normalised 1-D Wasserstein distances with a noise floor.
* **sharpness**: radially averaged power spectra; the power deficit in the structure band.
* **memorisation**: median nearest-neighbour distance generated -> training set, divided by
  the same for held-out -> training set.

Two-stage sampling (Dai & Wipf 2019, "Diagnosing and Enhancing VAE Models"; Ghosh et al.
2020, "From Variational to Deterministic Autoencoders", ex-post density estimation): a
Gaussian mixture fitted to the encoded means of the training set replaces the N(0, I) prior,
whose samples land where the aggregate posterior has no mass when the two differ. By default
the draws come from a second mixture built on the first: one Gaussian kernel per training code,
shaped like the covariance of the component that code belongs to and shrunk by a bandwidth (a
smoothed bootstrap, Silverman 1986, section 6.4.2, with locally shaped kernels as in Manifold
Parzen windows, Vincent & Bengio 2003). The 40 broad components put mass between galaxies
whose decodes are blends (lopsided, ghostly); kernels stay near codes the decoder was trained
on, while the bandwidth keeps samples as far from the training images as new galaxies are (the
memorisation ratio). It lives next to the model as ``sampler.pt`` (tensors only) and
``sampler.json`` (written last).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from ray_galaxy import morphology
from ray_galaxy.checkpoint import (MODEL_FILE, ModelDir, ModelDirError, _load_tensors, _tensor_bytes,
                                   exists, join, load_model_dir, read_bytes, write_bytes)
from ray_galaxy.config import ConfigError, _h
from ray_galaxy.model import LOG_2PI, ConvVAE, to_uint8

SAMPLER_FILE = "sampler.pt"
SAMPLER_META = "sampler.json"
SAMPLERS = ("auto", "prior", "gmm")
# The two-stage sampler's mixture: 40 full-covariance components fitted to the codes of the
# training images in all 8 orientations (see fit_gmm_sampler).
GMM_COMPONENTS = 40
SAMPLER_ORIENTATIONS = 8
SAMPLER_EM_TOL = 1e-5
CALIBRATION_SAMPLES = 1000  # sampler codes decoded to calibrate the detail model's gain
# Draws come from Gaussian kernels on the training codes themselves, each shaped like the
# covariance of the mixture component its code belongs to and scaled by this bandwidth
# (fit_gmm_sampler; 0 draws from the 40 components instead). Chosen on training data only
# (GZ2, three training runs; README "Two-stage sampler"): bandwidth 0.25 / 0.35 / 0.45 put
# samples 0.89-0.92 / 0.92-0.95 / 0.95-0.97 times as far from the training images as the
# job's own held-out galaxies (the memorisation ratio; the components: 1.02-1.03), and the
# morphology distance to the training images grows slowly with it (0.135-0.165 /
# 0.139-0.166 / 0.148-0.172; the components: 0.18-0.21). 0.45 is the smallest with samples
# at least about 0.95 as novel as new galaxies in every run.
KERNEL_BANDWIDTH = 0.45
COVARIANCES = ("full", "diag")

# Every metric metrics.json carries (dotted paths); tests check each is present.
METRIC_KEYS = (
    "likelihood.elbo_bpd", "likelihood.iwae_bpd", "reconstruction.psnr", "reconstruction.ssim",
    *(f"morphology.distance.{s}" for s in morphology.STATS),
    *(f"morphology.floor.{s}" for s in morphology.STATS),
    "morphology.mean_distance", "morphology.mean_floor",
    "sharpness.power_deficit_dex", "sharpness.floor_dex", "sharpness.reconstruction_dex",
    "memorisation.ratio", "memorisation.ratio_vs_reconstructions",
)


class SamplerError(ModelDirError):
    """The requested sampler is missing from the model directory or does not match it."""


def _log(msg: str) -> None:
    print(f"[ray-galaxy] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- configuration


@dataclass
class EvaluateConfig:
    """Settings of ``jobs/evaluate.py`` (each is also a ``--flag``)."""

    model: str = _h("Model directory written by jobs/train.py (path or URI).", default="")
    data: str = _h("Held-out images (folder, URI, prepared dataset or 'hubble-xdf'). If it is the "
                   "model's own training source, its validation split is used.", default="")
    out: str = _h("Output folder for report.md, metrics.json and the figures.", default="")
    crop: float = _h("Central crop fraction before resizing; 0 = the crop the model was trained with.",
                     default=0.0)
    n: int = _h("Number of generated images compared with the real ones.", default=1000)
    max_images: int = _h("At most this many held-out images (a seeded random subset).", default=1000)
    max_train: int = _h("At most this many training images (nearest neighbours, sampler fit).",
                        default=5000)
    train_data: str = _h("Training images for the memorisation check and the sampler fit; default: "
                         "train.data from the model's config.json when it can be read (its "
                         "training split). 'none' skips the memorisation check.", default="")
    sampler: str = _h("Latent sampler for generated images: 'prior' (N(0, I)), 'gmm' (sampler.pt) or "
                      "'auto' (gmm when the model directory has one, else prior).", default="auto")
    fit_sampler: bool = _h("Fit the GMM sampler first if the model directory has none.", default=False)
    detail: bool = _h("With the gmm sampler: draw generated images from p(x|z) with the sampler's "
                      "residual detail model (when it has one); false: decoder means only.", default=True)
    gmm_components: int = _h("Mixture components of a sampler fitted here.", default=GMM_COMPONENTS)
    gmm_covariance: str = _h("Covariance of a sampler fitted here: 'full' or 'diag'.", default="full")
    gmm_bandwidth: float = _h("Kernel bandwidth of a sampler fitted here (draws around the training codes); "
                              "0 draws from the mixture's components.", default=KERNEL_BANDWIDTH)
    iwae_k: int = _h("Importance samples per image for the IWAE bound.", default=32)
    temperature: float = _h("Scale of the sampler's noise (1 = as fitted).", default=1.0)
    seed: int = _h("Random seed (subsets, samples, IWAE noise); the same seed gives the same report.",
                   default=0)
    batch_size: int = _h("Images per forward pass.", default=64)

    def __post_init__(self) -> None:
        for key in ("model", "data", "out"):
            if not getattr(self, key):
                raise ConfigError(f"--{key} is required")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.gmm_covariance not in COVARIANCES:
            raise ConfigError(f"gmm_covariance must be one of {COVARIANCES}, got {self.gmm_covariance!r}")
        if not 0 <= self.crop <= 1:
            raise ConfigError(f"crop must be in (0, 1] (or 0 for the model's own), got {self.crop}")
        for key in ("n", "max_images", "max_train", "gmm_components", "iwae_k", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.n < 4 or self.max_images < 4:
            raise ConfigError("n and max_images must be at least 4 (distributions need a few images)")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not (self.gmm_bandwidth >= 0 and math.isfinite(self.gmm_bandwidth)):
            raise ConfigError(f"gmm_bandwidth must be a finite number >= 0, got {self.gmm_bandwidth}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- images


def _location(uri: str) -> str:
    from ray_galaxy.data import resolve_data_uri, resolve_uri

    fs, path = resolve_uri(resolve_data_uri(uri))
    return f"{fs.type_name}:{path.rstrip('/')}"


def same_source(a: str, b: str) -> bool:
    """Whether two data URIs name the same place (built-in names resolved first)."""
    try:
        return _location(a) == _location(b)
    except Exception:  # noqa: BLE001 - unreadable means "not provably the same"
        return a == b


def load_images(uri: str, size: int, crop: float, limit: int | None = None, split: str | None = None,
                val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """(N, size, size, 3) uint8 images from a folder/URI of pictures, a prepared dataset or 'hubble-xdf'.

    ``split`` ('train' or 'val') keeps one side of the training job's hash split
    (:func:`ray_galaxy.data.split_paths`, :func:`ray_galaxy.data.is_val`); ``limit`` keeps a
    seeded random subset. Unreadable files are skipped and counted.
    """
    from ray_galaxy.data import (BadImage, DataError, center_crop_resize, decode_image, is_val,
                                 list_images, resolve_data_uri, resolve_uri, split_paths)
    from ray_galaxy.prepare import read_manifest

    uri = resolve_data_uri(uri)
    fs, root = resolve_uri(uri)
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {"source": uri, "split": split or "all", "skipped": 0}
    manifest = read_manifest(uri)
    if manifest is not None and "shards" in manifest:  # jobs/prepare_data.py output: Parquet shards
        import pyarrow.parquet as pq
        from PIL import Image

        s = int(manifest["image_size"])
        raw, paths = [], []
        for shard in manifest["shards"]:
            t = pq.read_table(f"{root.rstrip('/')}/{shard}", columns=["image", "path"], filesystem=fs)
            raw += t.column("image").to_pylist()
            paths += t.column("path").to_pylist()
        keep = [i for i, p in enumerate(paths) if split is None or is_val(p, val_fraction) == (split == "val")]
        if limit is not None and len(keep) > limit:
            keep = sorted(rng.choice(keep, limit, replace=False).tolist())
        images = [np.frombuffer(raw[i], np.uint8).reshape(s, s, 3) for i in keep]
        if s != size or crop != 1.0:
            images = [np.asarray(center_crop_resize(Image.fromarray(im), size, crop)) for im in images]
        info["files"] = len(paths)
    else:
        paths = list_images(uri)
        info["files"] = len(paths)
        if split is not None:
            paths = split_paths(paths, val_fraction, root=root)[split == "val"]
        if limit is not None and len(paths) > limit:
            paths = [paths[i] for i in sorted(rng.choice(len(paths), limit, replace=False))]
        images = []
        for p in paths:
            try:
                with fs.open_input_stream(p) as f:
                    images.append(decode_image(f.read(), size, crop))
            except BadImage:
                info["skipped"] += 1
    if not images:
        raise DataError(f"no readable images in {uri!r} (split {info['split']})")
    info["images"] = len(images)
    return np.stack(images), info


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def model_train_config(md: ModelDir) -> dict[str, Any]:
    return md.config.get("train") or {}


def default_train_data(md: ModelDir) -> str | None:
    """The training source recorded in config.json, when it can still be read; else None."""
    from ray_galaxy.data import BUILTIN_DATASETS

    data = model_train_config(md).get("data")
    if not data:
        return None
    if data in BUILTIN_DATASETS:
        return data
    try:
        return data if exists(data) else None
    except Exception:  # noqa: BLE001 - an unreachable URI means "not available"
        return None


# --------------------------------------------------------------------------- likelihood


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
    nelbo, niwae, recon_all, kl_all, kl_dims = [], [], [], [], []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size])
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
        kl = model.kl(mu, logvar).double()
        recon_all.append(recon / k)
        kl_all.append(kl)
        nelbo.append(recon / k + kl)
        niwae.append(-(torch.logsumexp(w, 1) - math.log(k)))
        kl_dims.append((0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).double())
    nelbo_t, niwae_t = torch.cat(nelbo), torch.cat(niwae)
    return {
        "elbo_bpd": float(model.bits_per_dim(nelbo_t.mean())),
        "iwae_bpd": float(model.bits_per_dim(niwae_t.mean())),
        "nelbo_nats": float(nelbo_t.mean()),
        "niwae_nats": float(niwae_t.mean()),
        "recon_nats": float(torch.cat(recon_all).mean()),
        "kl_nats": float(torch.cat(kl_all).mean()),
        "kl_per_dim": torch.cat(kl_dims).mean(0).tolist(),
        "iwae_k": k,
        "images": len(images),
    }


# --------------------------------------------------------------------------- reconstruction


def reconstruct(model: ConvVAE, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Posterior-mean reconstructions as (N, S, S, 3) uint8 (what a PNG of them would hold)."""
    out = [to_uint8(model.reconstruct(to_tensor(images[i:i + batch_size]))).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def reconstruction_scores(real: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    """Mean PSNR (dB, data range 1) and mean SSIM (skimage, 7x7 window, over RGB) per image."""
    from skimage.metrics import structural_similarity

    a, b = real.astype(np.float64) / 255, recon.astype(np.float64) / 255
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1).clip(1e-10)
    ssim = [structural_similarity(x, y, channel_axis=-1, data_range=1.0) for x, y in zip(a, b)]
    return {"psnr": float(np.mean(10 * np.log10(1 / mse))), "ssim": float(np.mean(ssim))}


# --------------------------------------------------------------------------- Gaussian mixture


def _gmm_log_prob(x: np.ndarray, weights: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    """(N, K) log(w_k N(x_n; mu_k, Sigma_k)) via Cholesky factors."""
    from scipy.linalg import solve_triangular

    n, d = x.shape
    out = np.empty((n, len(weights)))
    for k in range(len(weights)):
        chol = np.linalg.cholesky(covs[k])
        sol = solve_triangular(chol, (x - means[k]).T, lower=True, check_finite=False)  # L^-1 (x - mu)
        logdet = 2 * np.log(np.diag(chol)).sum()
        out[:, k] = np.log(weights[k]) - 0.5 * (d * LOG_2PI + logdet + (sol ** 2).sum(0))
    return out


def fit_gmm(x: np.ndarray, components: int = 10, covariance: str = "full", seed: int = 0,
            max_iter: int = 500, tol: float = 1e-7, reg: float = 1e-6) -> dict[str, Any]:
    """Fit a Gaussian mixture to rows of ``x`` by expectation-maximisation (Dempster et al. 1977).

    Initialised with k-means++ seeding (Arthur & Vassilvitskii 2007) and hard assignment;
    ``reg`` is added to every covariance diagonal so it stays positive definite; stops when the
    mean log-likelihood improves by less than ``tol`` (relative). Returns weights (K,),
    means (K, D), covariances (K, D, D) (diagonal matrices for 'diag'), the final mean
    log-likelihood per point, the iterations run and whether it converged.
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    x = np.asarray(x, np.float64)
    n, d = x.shape
    k = max(1, min(components, n))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: next centre with probability ~ squared distance
        d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)])
    assign = np.argmin(np.stack([((x - c) ** 2).sum(1) for c in centres], 1), 1)
    resp = np.eye(k)[assign]
    prev, ll, converged, it = -np.inf, -np.inf, False, 0
    for it in range(1, max_iter + 1):
        # M step
        nk = resp.sum(0) + 1e-10
        weights = nk / n
        means = resp.T @ x / nk[:, None]
        covs = np.empty((k, d, d))
        for j in range(k):
            diff = x - means[j]
            c = (resp[:, j, None] * diff).T @ diff / nk[j]
            covs[j] = (np.diag(np.diag(c)) if covariance == "diag" else c) + reg * np.eye(d)
        # E step
        logp = _gmm_log_prob(x, weights, means, covs)
        top = logp.max(1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logp - top).sum(1))
        resp = np.exp(logp - lse[:, None])
        ll = float(lse.mean())
        if ll - prev < tol * max(1.0, abs(ll)):
            converged = True
            break
        prev = ll
    return {"weights": weights, "means": means, "covariances": covs, "log_likelihood": ll,
            "iterations": it, "converged": converged}


@torch.no_grad()
def encode_means(model: ConvVAE, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Posterior means mu(x) of many images: (N, latent_dim) float64."""
    model.eval()
    return np.concatenate([model.encode(to_tensor(images[i:i + batch_size]))[0].double().numpy()
                           for i in range(0, len(images), batch_size)])


def _model_sha(uri: str) -> str:
    return hashlib.sha256(read_bytes(join(uri, MODEL_FILE))).hexdigest()


def fit_gmm_sampler(model_dir_uri: str, train_data_uri: str | None = None, components: int = GMM_COMPONENTS,
                    covariance: str = "full", seed: int = 0, crop: float | None = None,
                    max_images: int = 5000, images: np.ndarray | None = None,
                    batch_size: int = 64, detail: bool = True,
                    orientations: int = SAMPLER_ORIENTATIONS,
                    bandwidth: float = KERNEL_BANDWIDTH) -> dict[str, Any]:
    """Fit the two-stage GMM sampler to a model's training set; write sampler.pt + sampler.json.

    The mixture is fitted to the codes of each training image in its first ``orientations``
    elements of D4 (all 8 by default): training saw every galaxy in all eight (a random D4
    element per image and epoch), so all eight are codes the decoder knows, and eight times
    as many codes estimate 40 full covariances far better than one orientation does (on GZ2,
    1257 images, the decodes' asymmetry distance went 0.80 -> 0.57 with the means alone;
    README, "Two-stage sampler" and "Seed vs default preset on Galaxy Zoo 2").

    With ``bandwidth`` > 0 (default :data:`KERNEL_BANDWIDTH`) the sampler draws from kernels on
    the codes (stored as ``kernel_*`` tensors; :func:`gmm_latents`): each code's kernel is the
    covariance of its most responsible component times ``bandwidth`` squared. 0 draws from the
    mixture's components.

    With ``detail`` it also fits the residual detail model (:mod:`ray_galaxy.detail`) to the
    training images and their reconstructions, stored as ``detail_*`` tensors in sampler.pt.

    ``train_data_uri`` defaults to the model's recorded training data (its training split);
    ``images`` (uint8, already at the model's size) skips reading. Returns sampler.json's content.
    """
    md = load_model_dir(model_dir_uri)
    tcfg = model_train_config(md)
    crop = crop or float(tcfg.get("crop", 1.0))
    source = train_data_uri or default_train_data(md)
    if images is None:
        if not source:
            raise SamplerError(f"{model_dir_uri}: no training data recorded or readable; pass --train-data")
        split = "train" if same_source(source, tcfg.get("data", "")) else None
        images, _ = load_images(source, md.model.config.image_size, crop, limit=max_images, split=split,
                                val_fraction=float(tcfg.get("val_fraction", 0.1)), seed=seed)
    if not 1 <= orientations <= len(D4):
        raise ValueError(f"orientations must be in 1..{len(D4)}, got {orientations}")
    if not (bandwidth >= 0 and math.isfinite(bandwidth)):
        raise ValueError(f"bandwidth must be a finite number >= 0, got {bandwidth}")
    mu = encode_means(md.model, images, batch_size)  # (N, D), orientation 0: also the detail fit's
    codes = np.concatenate([mu] + [encode_means(md.model, orient(images, o), batch_size)
                                   for o in range(1, orientations)])  # (orientations * N, D)
    # tol 1e-5: on GZ2 (10,056 codes, 40 components) EM stops after ~100-125 iterations (about a
    # minute on 2 cores), within 0.1 % of the log-likelihood at 1e-6 (180 iterations); fit_gmm's
    # default 1e-7 had not converged after 500 iterations (3.5 min).
    gmm = fit_gmm(codes, components, covariance, seed, tol=SAMPLER_EM_TOL)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(gmm[k])) for k in ("weights", "means", "covariances")}
    if bandwidth > 0:
        owner = np.argmax(_gmm_log_prob(codes, gmm["weights"], gmm["means"], gmm["covariances"]), 1)
        tensors.update({"kernel_codes": torch.from_numpy(np.ascontiguousarray(codes, np.float32)),
                        "kernel_component": torch.from_numpy(owner.astype(np.int64)),
                        "kernel_bandwidth": torch.tensor(float(bandwidth), dtype=torch.float64)})
    detail_meta = None
    if detail:
        from ray_galaxy.detail import calibrate_gain, fit_detail, k_min

        d = fit_detail(images, decode_means(md.model, torch.from_numpy(mu).float()))
        # Calibrate on what is sampled: decodes of the sampler's own codes (seeded, like the fit).
        sampled = decode_means(md.model, gmm_latents(tensors, CALIBRATION_SAMPLES, seed))
        cal = calibrate_gain(sampled, d, images, seed=seed)
        d["spectrum"] = d["spectrum"] * cal["gain"] ** 2  # the gain on the residual, folded in
        tensors.update({f"detail_{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()})
        detail_meta = {"k_min": k_min(md.model.config.image_size),
                       "variance_coef": [float(c) for c in d["variance_coef"]],
                       "gain": cal["gain"], "power_deficit_dex_at_gain_1": cal["deficit_dex_at_1"],
                       "power_deficit_dex": cal["deficit_dex"]}
    meta = {"format": 2, "kind": "gmm", "components": int(len(gmm["weights"])), "covariance": covariance,
            "kernels": "codes" if bandwidth > 0 else "components", "bandwidth": float(bandwidth),
            "seed": seed, "train_data": source, "train_images": int(len(images)),
            "orientations": orientations, "codes": int(len(codes)),
            "mean_log_likelihood": gmm["log_likelihood"], "iterations": gmm["iterations"],
            "converged": gmm["converged"], "model_sha256": _model_sha(model_dir_uri),
            "latent_dim": md.model.config.latent_dim, "detail": detail_meta}
    write_bytes(join(model_dir_uri, SAMPLER_FILE), _tensor_bytes(tensors))
    write_bytes(join(model_dir_uri, SAMPLER_META), json.dumps(meta, indent=1).encode())  # marker, last
    return meta


def load_sampler(model_dir: ModelDir | str) -> dict[str, Any] | None:
    """The GMM sampler of a model directory (tensors + meta), None if it has none.

    Takes a loaded :class:`ModelDir` or just its URI (the Serve ingress never loads weights).
    Raises :class:`SamplerError` if it was fitted to another model.pt (the model was retrained).
    """
    uri = model_dir if isinstance(model_dir, str) else model_dir.uri
    try:
        meta = json.loads(read_bytes(join(uri, SAMPLER_META)))
    except (FileNotFoundError, OSError):
        return None
    if meta.get("model_sha256") != _model_sha(uri):
        raise SamplerError(f"{uri}: {SAMPLER_FILE} was fitted to a different model.pt; refit it "
                           "(jobs/fit_sampler.py or jobs/evaluate.py --fit-sampler)")
    tensors = _load_tensors(read_bytes(join(uri, SAMPLER_FILE)), join(uri, SAMPLER_FILE))
    return {**tensors, "meta": meta}


def resolve_sampler(model_dir: ModelDir | str, sampler: str) -> str:
    """'auto' -> 'gmm' when the model directory has a (current) sampler, else 'prior'.

    With a small KL weight the N(0, I) prior's samples land in holes of the latent space, so
    every job and the Serve app use the fitted sampler by default when there is one."""
    if sampler != "auto":
        return sampler
    try:
        return "gmm" if load_sampler(model_dir) is not None else "prior"
    except SamplerError:
        return "prior"


def sample_latents(model_dir: ModelDir | str, n: int, seed: int = 0, sampler: str = "prior",
                   temperature: float = 1.0) -> torch.Tensor:
    """(n, latent_dim) latent codes from the N(0, I) prior or the directory's GMM sampler.

    The same (seed, n) gives the same codes. 'prior' matches :meth:`ConvVAE.prior_latents`.
    For 'gmm', temperature scales the spread of each kernel (or component) around its centre.
    """
    md = load_model_dir(model_dir) if isinstance(model_dir, str) else model_dir
    sampler = resolve_sampler(md, sampler)
    if sampler == "prior":
        return md.model.prior_latents(n, seed, temperature)
    if sampler != "gmm":
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    gmm = load_sampler(md)
    if gmm is None:
        raise SamplerError(f"{md.uri} has no {SAMPLER_FILE}; fit one with "
                           f"`python jobs/fit_sampler.py --model {md.uri}` or pass --fit-sampler")
    return gmm_latents(gmm, n, seed, temperature)


def detail_model(sampler: Mapping[str, Any] | None) -> dict[str, torch.Tensor] | None:
    """The residual detail model inside a loaded sampler, None if it was fitted without one."""
    if not sampler or "detail_spectrum" not in sampler:
        return None
    return {k[len("detail_"):]: v for k, v in sampler.items() if k.startswith("detail_")}


def generate(model_dir: ModelDir | str, n: int, seed: int = 0, sampler: str = "auto",
             temperature: float = 1.0, detail: bool = True, batch_size: int = 256,
             keep: int | None = None) -> torch.Tensor:
    """n generated galaxies, (n, 3, S, S) floats in [0, 1]; the same seed gives the same images.

    'prior' decodes N(0, I) codes; 'auto' (default) is 'gmm' when the directory has a sampler;
    'gmm' decodes the sampler's codes and, when the sampler has a
    residual detail model and ``detail`` is true, draws from p(x | z) around the decoded mean
    (:func:`ray_galaxy.detail.add_detail`, noise seeded by ``seed``). Without it: the means.
    ``keep`` returns only the first images of the n (the same bytes, less decoding).
    """
    from ray_galaxy.detail import add_detail

    md = load_model_dir(model_dir) if isinstance(model_dir, str) else model_dir
    sampler = resolve_sampler(md, sampler)
    z = sample_latents(md, n, seed, sampler, temperature)[:keep]
    means = torch.cat([md.model.decode(z[i:i + batch_size]) for i in range(0, len(z), batch_size)])
    d = detail_model(load_sampler(md)) if sampler == "gmm" and detail else None
    return means if d is None else add_detail(means, d, seed=seed)


def gmm_latents(gmm: Mapping[str, torch.Tensor], n: int, seed: int = 0, temperature: float = 1.0
                ) -> torch.Tensor:
    """(n, latent_dim) codes drawn from a fitted sampler (``load_sampler``'s tensors), by seed.

    With kernels on the training codes (``kernel_*`` tensors): a uniformly chosen code plus
    Gaussian noise shaped by its component's covariance times the bandwidth; otherwise a
    component by weight plus noise shaped by its covariance. ``temperature`` scales the noise.
    """
    g = torch.Generator().manual_seed(int(seed))
    chol = torch.linalg.cholesky(gmm["covariances"].double())
    if "kernel_codes" in gmm:
        codes = gmm["kernel_codes"]  # (8 N, D): index first, so a request converts only its rows
        pick = torch.randint(len(codes), (n,), generator=g)
        comp, centre = gmm["kernel_component"][pick], codes[pick].double()
        scale = temperature * float(gmm["kernel_bandwidth"])
    else:
        comp = torch.multinomial(gmm["weights"].double(), n, replacement=True, generator=g)
        centre, scale = gmm["means"].double()[comp], temperature
    eps = torch.randn(n, gmm["means"].shape[1], generator=g, dtype=torch.float64)
    z = centre + scale * (chol[comp] @ eps[..., None])[..., 0]
    return z.float()


def gmm_variance(gmm: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Per-dimension variance of the mixture (law of total variance): how much each latent
    dimension varies across the training set's codes."""
    w = gmm["weights"].double().numpy()
    means = gmm["means"].double().numpy()
    var = np.einsum("kii->ki", gmm["covariances"].double().numpy())
    mean = w @ means
    return w @ (var + means ** 2) - mean ** 2


def decode_means(model: ConvVAE, z: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Latents -> the decoder's means, (N, S, S, 3) floats in [0, 1]."""
    return np.concatenate([model.decode(z[i:i + batch_size]).permute(0, 2, 3, 1).numpy()
                           for i in range(0, len(z), batch_size)])


def decode_images(model: ConvVAE, z: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Latents -> (N, S, S, 3) uint8, as jobs/sample.py would write them."""
    return np.concatenate([to_uint8(model.decode(z[i:i + batch_size])).numpy()
                           for i in range(0, len(z), batch_size)])


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between latents a and b (White 2016, "Sampling Generative Networks").

    Follows the great circle of the directions while scaling norms, which keeps intermediate
    codes at the typical radius of a high-dimensional Gaussian (linear paths pass too near 0).
    """
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - t)[:, None] * a + t[:, None] * b
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so)[:, None] * a + (torch.sin(t * omega) / so)[:, None] * b


# --------------------------------------------------------------------------- memorisation


D4 = [(r, f) for f in (False, True) for r in range(4)]  # rotation by r * 90 degrees, then mirror


def orient(images: np.ndarray, o: int) -> np.ndarray:
    """Element ``o`` (0..7) of the dihedral group D4 applied to (N, S, S, 3) images."""
    r, f = D4[o]
    y = np.rot90(images, r, axes=(1, 2))
    return np.ascontiguousarray(y[:, :, ::-1] if f else y)


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


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# --------------------------------------------------------------------------- the whole evaluation


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run every metric, write figures, metrics.json and report.md under ``cfg.out``."""
    from pathlib import Path

    from ray_galaxy import figures, plots

    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    md = load_model_dir(cfg.model)
    model = md.model.eval()
    mcfg, tcfg = model.config, model_train_config(md)
    size = mcfg.image_size
    crop = cfg.crop or float(tcfg.get("crop", 1.0))
    val_fraction = float(tcfg.get("val_fraction", 0.1))

    if cfg.sampler == "auto":
        cfg = dataclasses.replace(cfg, sampler="gmm" if cfg.fit_sampler else resolve_sampler(md, "auto"))
        _log(f"sampler: {cfg.sampler} (auto)")
    # Fail fast on a missing sampler, before any data is read.
    gmm_meta = None
    if cfg.sampler == "gmm":
        try:
            sampler = load_sampler(md)
        except SamplerError:
            if not cfg.fit_sampler:
                raise
            sampler = None  # stale (fitted to another model.pt): refit below
        if sampler is None and not cfg.fit_sampler:
            raise SamplerError(f"{md.uri} has no {SAMPLER_FILE}; pass --fit-sampler to fit one now, or run "
                               f"`python jobs/fit_sampler.py --model {md.uri}`")
        gmm_meta = sampler["meta"] if sampler else None

    # Data: held-out images, and the training images when they can be found.
    own = bool(tcfg.get("data")) and same_source(cfg.data, tcfg["data"])
    real, real_info = load_images(cfg.data, size, crop, cfg.max_images, "val" if own else None,
                                  val_fraction, cfg.seed)
    _log(f"held-out: {len(real)} images from {cfg.data} ({real_info['split']}), {size}px, crop {crop}")
    train_uri = None if cfg.train_data == "none" else (cfg.train_data or default_train_data(md))
    train, train_info, skip_reason = None, None, None
    if train_uri:
        own_train = bool(tcfg.get("data")) and same_source(train_uri, tcfg["data"])
        train, train_info = load_images(train_uri, size, crop, cfg.max_train, "train" if own_train else None,
                                        val_fraction, cfg.seed)
        _log(f"training set: {len(train)} images from {train_uri} ({train_info['split']})")
    else:
        skip_reason = ("skipped (--train-data none)" if cfg.train_data == "none" else
                       "skipped: the model's training data is not readable here; pass --train-data")
        _log(f"memorisation check {skip_reason}")
    if cfg.sampler == "gmm" and gmm_meta is None:
        if train is None:
            raise SamplerError("--fit-sampler needs the training images; pass --train-data")
        gmm_meta = fit_gmm_sampler(cfg.model, train_uri, cfg.gmm_components, cfg.gmm_covariance, cfg.seed,
                                   crop, images=train, batch_size=cfg.batch_size, bandwidth=cfg.gmm_bandwidth)
        _log(f"fitted a {gmm_meta['components']}-component {gmm_meta['covariance']} GMM sampler "
             f"({gmm_meta['iterations']} EM iterations) and stored it in {md.uri}")

    # Likelihood and reconstruction.
    lik = likelihood_bounds(model, real, cfg.iwae_k, cfg.seed, cfg.batch_size)
    _log(f"likelihood: -ELBO {lik['elbo_bpd']:.4f} bits/dim, IWAE-{cfg.iwae_k} {lik['iwae_bpd']:.4f} bits/dim")
    recon = reconstruct(model, real, cfg.batch_size)
    rec = reconstruction_scores(real, recon)
    _log(f"reconstruction: PSNR {rec['psnr']:.2f} dB, SSIM {rec['ssim']:.3f}")

    # Generated galaxies: draws from p(x | z) when the sampler has a detail model, else the means.
    from ray_galaxy.detail import add_detail

    detail = detail_model(load_sampler(md)) if cfg.sampler == "gmm" and cfg.detail else None
    detail_used = detail is not None
    means_f = generate(md, cfg.n, cfg.seed, cfg.sampler, cfg.temperature, detail=False)
    gen = to_uint8(add_detail(means_f, detail, seed=cfg.seed) if detail_used else means_f).numpy()
    m_real = morphology.measure_all(real)
    k, p_real = morphology.radial_power_spectrum(morphology.luminance(real))
    means_only = None
    if detail_used:  # the same codes' decoder means, so the report shows what the detail adds
        means = to_uint8(means_f).numpy()
        m_means = morphology.wasserstein_table(m_real, morphology.measure_all(means), cfg.seed)
        _, p_means = morphology.radial_power_spectrum(morphology.luminance(means))
        means_only = {
            "morphology_mean_distance": float(np.nanmean([v["distance"] for v in m_means.values()])),
            "morphology_distance": {name: v["distance"] for name, v in m_means.items()},
            "power_deficit_dex": morphology.power_deficit_dex(k, p_means, p_real, size),
            "memorisation_ratio": (memorisation(means, real, train)["ratio"] if train is not None else None),
        }
        _log(f"decoder means alone: morphology {means_only['morphology_mean_distance']:.3f}, structure-band "
             f"power {means_only['power_deficit_dex']:+.3f} dex")

    # Morphology.
    m_gen = morphology.measure_all(gen)
    table = morphology.wasserstein_table(m_real, m_gen, cfg.seed)
    dist = {k: v["distance"] for k, v in table.items()}
    floor = {k: v["floor"] for k, v in table.items()}
    summary = {}
    for name, vals in (("real", m_real), ("generated", m_gen)):
        summary[name] = {k: {"mean": float(np.nanmean(v)) if np.isfinite(v).any() else math.nan,
                             "std": float(np.nanstd(v)) if np.isfinite(v).any() else math.nan}
                         for k, v in vals.items()}
    failed = {name: float(np.mean(~np.isfinite(vals["concentration"])))
              for name, vals in (("real", m_real), ("generated", m_gen))}
    morph = {"distance": dist, "floor": floor,
             "mean_distance": float(np.nanmean(list(dist.values()))),
             "mean_floor": float(np.nanmean(list(floor.values()))),
             "summary": summary, "failed_fraction": failed}
    _log(f"morphology: mean normalised distance {morph['mean_distance']:.3f} (floor {morph['mean_floor']:.3f})")

    # Sharpness.
    _, p_gen = morphology.radial_power_spectrum(morphology.luminance(gen))
    _, p_rec = morphology.radial_power_spectrum(morphology.luminance(recon))  # the decoder's own blur
    halves = np.random.default_rng(cfg.seed).permutation(len(real))
    _, p_h1 = morphology.radial_power_spectrum(morphology.luminance(real[halves[: len(real) // 2]]))
    _, p_h2 = morphology.radial_power_spectrum(morphology.luminance(real[halves[len(real) // 2:]]))
    band = morphology.structure_band(size)
    sharp = {"power_deficit_dex": morphology.power_deficit_dex(k, p_gen, p_real, size),
             "floor_dex": abs(morphology.power_deficit_dex(k, p_h1, p_h2, size)),
             "reconstruction_dex": morphology.power_deficit_dex(k, p_rec, p_real, size),
             "band_cycles_per_image": list(band), "k": k.tolist(),
             "power_real": p_real.tolist(), "power_generated": p_gen.tolist()}
    _log(f"sharpness: structure-band power {sharp['power_deficit_dex']:+.3f} dex vs real")

    # Memorisation.
    if train is not None:
        mem = memorisation(gen, real, train, recon)
        _log(f"memorisation: NN distance ratio {mem['ratio']:.3f}")
    else:
        mem = {"ratio": None, "skipped": skip_reason}

    # Figures.
    files: list[tuple[str, str, str]] = []  # (file, title, caption)

    def save(name: str, image: np.ndarray, title: str, caption: str) -> None:
        (out / name).write_bytes(figures.png_bytes(image))
        files.append((name, title, caption))

    save("samples.png", figures.grid(gen[:64]), "Samples",
         f"64 generated galaxies ({cfg.sampler} sampler{' with residual detail' if detail_used else ''}, "
         f"seed {cfg.seed}, temperature {cfg.temperature}).")
    if detail_used:
        save("samples_means.png", figures.grid(means[:64]), "Samples: decoder means",
             "The same 64 latent codes decoded to their means, without the residual detail.")
    dims = figures.most_active_dims(lik["kl_per_dim"], k=2)
    if cfg.sampler == "gmm" and model.config.latent_dim >= 2:
        trav, (d0, d1) = figures.sampler_traversal(model, load_sampler(md))
        save("traversal.png", trav, "Latent traversal",
             f"Latent dims {d0} (down) and {d1} (across), the two that vary most over the training codes, "
             "swept over +-2.5 standard deviations around the sampler's mean code.")
    elif len(dims) == 2:
        save("traversal.png", figures.traversal(model, dims), "Latent traversal",
             f"Latent dims {dims[0]} (down) and {dims[1]} (across), the two with most KL on the held-out "
             "set, swept over -3..3 with the others at 0.")
    zi = sample_latents(md, 12, cfg.seed + 1, cfg.sampler, cfg.temperature)
    t = torch.linspace(0, 1, 10)
    path = torch.cat([slerp(zi[2 * i], zi[2 * i + 1], t) for i in range(6)])
    save("interpolations.png", figures.grid(decode_images(model, path), ncols=10), "Interpolations",
         "Each row: spherical interpolation (slerp) between two sampled latents, 10 steps.")
    nshow = min(12, len(real))
    save("reconstructions.png", figures.pairs(real[:nshow], recon[:nshow]), "Reconstructions",
         "Top: held-out galaxies; bottom: their posterior-mean reconstructions.")
    if train is not None:
        nn = min(12, len(gen))
        near = np.stack([orient(train[mem["nn_index"][i]][None], mem["nn_orientation"][i])[0] for i in range(nn)])
        save("nearest_neighbours.png", figures.pairs(gen[:nn], near), "Nearest training images",
             "Top: generated galaxies; bottom: the nearest training image (pixel L2, any of 8 orientations).")
    save("morphology.png", plots.panels(
        [plots.histogram([("real", m_real[s]), ("generated", m_gen[s])],
                         f"{morphology.LABELS[s]}  W/sd {_fmt(dist[s], 2)}") for s in morphology.STATS],
        ncols=4, size=(320, 230), title="Morphology: held-out (real) vs generated"),
        "Morphology", "Distributions of each statistic; W/sd is the normalised Wasserstein distance.")
    save("power_spectrum.png", plots.panels([plots.line_chart(
        [("real", k, p_real), ("generated", k, p_gen)], "Radially averaged power spectrum of luminance",
        "cycles per image", "power", logx=True, logy=True, band=band)], ncols=1, size=(620, 400)),
        "Power spectrum", f"Shaded: the structure band {band[0]:g}-{band[1]:g} cycles/image where the "
        "deficit is measured; higher frequencies are sensor noise.")
    hist = md.metrics.get("history") or []
    if hist:
        ep = [h.get("epoch", i + 1) for i, h in enumerate(hist)]

        def series(*keys: str) -> list[tuple[str, list, list]]:
            return [(key, ep, [h.get(key, math.nan) for h in hist]) for key in keys
                    if any(key in h for h in hist)]

        charts = [plots.line_chart(series("train_loss", "val_loss"), "loss", "epoch"),
                  plots.line_chart(series("val_bpd"), "validation bits/dim", "epoch"),
                  plots.line_chart(series("val_psnr"), "validation PSNR (dB)", "epoch")]
        save("training_curves.png", plots.panels(charts, ncols=3, size=(380, 270)), "Training curves",
             "Per-epoch history from metrics.json (loss uses the configured KL weight and warm-up).")

    metrics = {
        "format": 1, "model": cfg.model, "data": cfg.data, "held_out": real_info,
        "train_data": train_uri, "train": train_info, "crop": crop, "image_size": size,
        "likelihood_kind": mcfg.likelihood, "sampler": cfg.sampler, "sampler_meta": gmm_meta,
        "detail": detail_used, "means_only": means_only,
        "n_generated": int(len(gen)), "seed": cfg.seed, "temperature": cfg.temperature,
        "likelihood": lik, "reconstruction": rec, "morphology": morph, "sharpness": sharp,
        "memorisation": mem, "figures": [f[0] for f in files], "config": cfg.to_dict(),
        "seconds": round(time.time() - t0, 1),
    }
    metrics = _clean(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "report.md").write_text(report_markdown(metrics, files))
    _log(f"wrote {out / 'report.md'} in {metrics['seconds']:.0f}s")
    return metrics


def get_metric(metrics: dict[str, Any], dotted: str) -> Any:
    """metrics['a']['b'] for 'a.b'."""
    v: Any = metrics
    for part in dotted.split("."):
        v = v[part]
    return v


def _sampler_kind(m: dict[str, Any]) -> str:
    """' (kernels on 10056 training codes, bandwidth 0.45)' for the report, '' for the prior."""
    meta = m.get("sampler_meta") or {}
    if m.get("sampler") != "gmm" or not meta:
        return ""
    if meta.get("kernels") == "codes":
        return f" (kernels on {meta['codes']} training codes, bandwidth {meta['bandwidth']:g})"
    return f" ({meta.get('components')} mixture components)"


def report_markdown(m: dict[str, Any], files: list[tuple[str, str, str]]) -> str:
    """The human-readable report: headline table, morphology table, caveats, figures."""
    lik, rec, mo, sh, mem = m["likelihood"], m["reconstruction"], m["morphology"], m["sharpness"], m["memorisation"]
    lines = [
        "# Evaluation report", "",
        f"- model: `{m['model']}` ({m['likelihood_kind']} likelihood, {m['image_size']}px, crop {m['crop']})",
        f"- held-out images: {m['held_out']['images']} from `{m['held_out']['source']}` "
        f"(split: {m['held_out']['split']}; {m['held_out']['skipped']} unreadable skipped)",
        f"- training images: " + (f"{m['train']['images']} from `{m['train_data']}` (split: {m['train']['split']})"
                                  if m["train"] else "not available"),
        f"- generated: {m['n_generated']} images, sampler `{m['sampler']}`{_sampler_kind(m)}, seed {m['seed']}, "
        f"temperature {m['temperature']}", "",
        "## Summary", "",
        "| metric | value | note |", "|---|---|---|",
        f"| negative ELBO (KL weight 1) | {_fmt(lik['elbo_bpd'], 4)} bits/dim | lower is better |",
        f"| IWAE bound, K={lik['iwae_k']} | {_fmt(lik['iwae_bpd'], 4)} bits/dim | tighter (lower) than the ELBO |",
        f"| reconstruction PSNR | {_fmt(rec['psnr'], 2)} dB | posterior mean |",
        f"| reconstruction SSIM | {_fmt(rec['ssim'], 3)} | |",
        f"| morphology distance (mean W/sd) | {_fmt(mo['mean_distance'])} | noise floor {_fmt(mo['mean_floor'])} |",
        f"| structure-band power vs real | {_fmt(sh['power_deficit_dex'], 3)} dex | "
        f"{sh['band_cycles_per_image'][0]:g}-{sh['band_cycles_per_image'][1]:g} cycles/image; "
        f"negative = missing detail; floor {_fmt(sh['floor_dex'], 3)} |",
        f"| structure-band power of reconstructions | {_fmt(sh['reconstruction_dex'], 3)} dex | "
        "the decoder's own blur, for reference |",
        f"| memorisation ratio | {_fmt(mem.get('ratio'))} | "
        + ("median NN distance to the training set, generated / held-out; ~1 is healthy, "
           "< 1 copies or blur |" if mem.get("ratio") is not None else f"{mem.get('skipped')} |"),
        f"| memorisation ratio vs reconstructions | {_fmt(mem.get('ratio_vs_reconstructions'))} | "
        "the same over held-out reconstructions: as blurry, not copies; < 1 means copying |",
        "",
        "Bits/dim of a `bce` model are not comparable with those of a `gaussian` one: cross-entropy on "
        "grey values is not a normalised likelihood.", "",
    ]
    mo_ = m.get("means_only")
    gain = ((m.get("sampler_meta") or {}).get("detail") or {}).get("gain")
    if mo_:
        lines += [
            "## Residual detail", "",
            "Generated images are draws from p(x | z): the decoder's mean plus the sampler's residual "
            "detail model (texture the mean cannot predict: amplitude following the galaxy's light, "
            "spatially correlated, from 1/16 of the image size down)"
            + (f", its amplitude scaled by {_fmt(gain, 2)} when the sampler was fitted so that samples have the "
               "training images' structure-band power" if gain is not None else "")
            + ". The same codes' means alone:", "",
            "| metric | with detail | means only |", "|---|---|---|",
            f"| morphology distance (mean W/sd) | {_fmt(mo['mean_distance'])} | {_fmt(mo_['morphology_mean_distance'])} |",
            f"| structure-band power vs real | {_fmt(sh['power_deficit_dex'], 3)} dex | "
            f"{_fmt(mo_['power_deficit_dex'], 3)} dex |",
            f"| memorisation ratio | {_fmt(mem.get('ratio'))} | {_fmt(mo_.get('memorisation_ratio'))} |", "",
        ]
    lines += [
        "## Morphology", "",
        "Normalised 1-D Wasserstein distance between the real and generated distributions (divided by "
        "the real standard deviation), next to the same distance between two halves of the real set. "
        f"Failed measurements: real {mo['failed_fraction']['real']:.1%}, "
        f"generated {mo['failed_fraction']['generated']:.1%}.", "",
        "| statistic | real mean ± sd | generated mean ± sd | W/sd | floor |", "|---|---|---|---|---|",
    ]
    for s in morphology.STATS:
        r, g = mo["summary"]["real"][s], mo["summary"]["generated"][s]
        lines.append(f"| {morphology.LABELS[s]} | {_fmt(r['mean'])} ± {_fmt(r['std'])} | "
                     f"{_fmt(g['mean'])} ± {_fmt(g['std'])} | {_fmt(mo['distance'][s])} | {_fmt(mo['floor'][s])} |")
    lines += ["", "## Figures", ""]
    for name, title, caption in files:
        lines += [f"### {title}", "", f"![{title}]({name})", "", caption, ""]
    lines += ["Definitions and caveats: the ray-galaxy README, section \"Evaluate\".", ""]
    return "\n".join(lines)


def main_entry(cfg: EvaluateConfig) -> int:
    """Entry point for jobs/evaluate.py: run, print expected errors as one line, return an exit code."""
    from ray_galaxy.data import DataError

    try:
        evaluate(cfg)
    except (DataError, ModelDirError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
