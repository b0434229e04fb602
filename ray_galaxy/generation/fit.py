"""Fit the two-stage sampler (mixture, kernels, residual detail) into a model directory."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ray_galaxy.checkpoint import load_model_dir
from ray_galaxy.console import log
from ray_galaxy.generation.detail import calibrate_gain, fit_detail, k_min
from ray_galaxy.generation.generator import decode
from ray_galaxy.generation.sampler import (GMM_COMPONENTS, KERNEL_BANDWIDTH, SAMPLER_ORIENTATIONS,
                                           MixtureSampler, SamplerError, fit_codes, save_sampler)
from ray_galaxy.imageset import read_image_set, recorded_train_data, same_source
from ray_galaxy.labels import describe_labels
from ray_galaxy.model import ConvVAE

CALIBRATION_SAMPLES = 1000  # sampler codes decoded to calibrate the detail model's gain


def _means(model: ConvVAE, z: torch.Tensor) -> np.ndarray:
    """Decoded means as (N, S, S, 3) floats in [0, 1] (what the detail fit compares)."""
    return decode(model, z.float()).permute(0, 2, 3, 1).numpy()


def _detail(model: ConvVAE, sampler: MixtureSampler, images: np.ndarray, mu: np.ndarray,
            seed: int) -> dict[str, Any]:
    """Fit the residual detail to the images and their reconstructions, then calibrate its gain on
    decodes of the sampler's own codes (seeded, like the fit); the tensors go into the sampler."""
    d = fit_detail(images, _means(model, torch.from_numpy(mu)))
    sampled = _means(model, sampler.latents(CALIBRATION_SAMPLES, seed))
    cal = calibrate_gain(sampled, d, images, seed=seed)
    d["spectrum"] = d["spectrum"] * cal["gain"] ** 2  # the gain on the residual, folded in
    sampler.tensors.update({f"detail_{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()})
    return {"k_min": k_min(model.config.image_size), "variance_coef": [float(c) for c in d["variance_coef"]],
            "gain": cal["gain"], "power_deficit_dex_at_gain_1": cal["deficit_dex_at_1"],
            "power_deficit_dex": cal["deficit_dex"]}


def fit_sampler(model_dir: str, train_data: str | None = None, components: int = GMM_COMPONENTS,
                covariance: str = "full", seed: int = 0, crop: float | None = None,
                max_images: int = 5000, images: np.ndarray | None = None, batch_size: int = 64,
                detail: bool = True, orientations: int = SAMPLER_ORIENTATIONS,
                bandwidth: float = KERNEL_BANDWIDTH, labels: str | None = None,
                image_labels: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Fit the two-stage sampler to a model's training images; write sampler.pt + sampler.json.

    ``train_data`` defaults to the model's recorded training data (its training split);
    ``images`` (uint8, already at the model's size) skips reading. With ``bandwidth`` > 0 draws
    come from kernels on the codes, 0 draws from the mixture's components. With ``detail`` the
    residual detail model is fitted too. Returns sampler.json's content.

    Fitted per label when the images have classes: from the ``labels`` CSV (default: the one
    training recorded, ``train.labels``), else from prepared shards that store them, or
    ``image_labels`` (one class or None per image) alongside ``images``.
    """
    md = load_model_dir(model_dir)
    tcfg = md.train_config
    source = train_data or recorded_train_data(tcfg)
    if images is None:
        labels = labels or tcfg.get("labels") or None
        if not source:
            raise SamplerError(f"{model_dir}: no training data recorded or readable; pass --train-data")
        split = "train" if same_source(source, tcfg.get("data", "")) else None
        found = read_image_set(source, md.model_config.image_size, crop or float(tcfg.get("crop", 1.0)),
                               limit=max_images, split=split, val_fraction=float(tcfg.get("val_fraction", 0.1)),
                               seed=seed, labels=labels)
        images, image_labels = found.images, found.labels
        labels = found.info.get("labels_source")
    elif labels is not None and image_labels is None:
        raise ValueError("a labels CSV matches images by file name: with images= pass image_labels instead")
    if image_labels is not None:
        log(describe_labels(image_labels, labels or "image_labels"))
    tensors, meta, mu = fit_codes(md.model, images, components, covariance, seed, orientations, bandwidth,
                                  batch_size, labels=image_labels)
    sampler = MixtureSampler(tensors, {**meta, "train_data": source, "labels_source": labels,
                                       "model_sha256": md.sha256})
    sampler.meta["detail"] = _detail(md.model, sampler, images, mu, seed) if detail else None
    save_sampler(model_dir, sampler)
    return sampler.meta
