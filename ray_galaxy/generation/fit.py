"""Fit the two-stage sampler (mixture, kernels, residual detail) into a model directory."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ray_galaxy.checkpoint import ModelDir, load_model_dir
from ray_galaxy.config import DETAIL_MODES
from ray_galaxy.console import log
from ray_galaxy.generation.detail import DETAIL_IMAGES, DETAIL_KINDS, GAIN_BOUNDS, calibrate_gain, fit_detail, k_min
from ray_galaxy.generation.generator import decode
from ray_galaxy.generation.properties import PROPERTY_NAMES, measure_properties
from ray_galaxy.generation.sampler import (GMM_COMPONENTS, KERNEL_BANDWIDTH, SAMPLER_ORIENTATIONS,
                                           MixtureSampler, SamplerError, check_fit_arguments, encode_means,
                                           fit_codes, read_sampler, save_sampler)
from ray_galaxy.imageset import read_image_set, recorded_train_data, same_source
from ray_galaxy.labels import describe_labels
from ray_galaxy.model import ConvVAE

CALIBRATION_SAMPLES = 1000  # sampler codes decoded to calibrate the detail model's gain


def _means(model: ConvVAE, z: torch.Tensor) -> np.ndarray:
    """Decoded means as (N, S, S, 3) floats in [0, 1] (what the detail fit compares), in float32:
    the fit's statistics do not need the float64 that makes served bytes reproducible, and on a
    CPU float64 decodes at about a quarter of the rate (docs/model.md, "Decoding precision")."""
    return decode(model, z.float(), dtype=torch.float32).permute(0, 2, 3, 1).numpy()


def _detail(model: ConvVAE, sampler: MixtureSampler, images: np.ndarray, mu: np.ndarray,
            seed: int, kind: str = "galaxy") -> dict[str, Any]:
    """Fit the residual detail to the images and their reconstructions, then calibrate its gain on
    decodes of the sampler's own codes (seeded, like the fit); the tensors go into the sampler.
    Sky noise (``kind`` "sky") keeps its measured amplitude (gain 1): its job is the sky's noise,
    not the structure-band power the calibration matches."""
    n = min(len(images), DETAIL_IMAGES)  # the images the fit uses: decode no more
    d = fit_detail(images[:n], _means(model, torch.from_numpy(mu[:n])), kind=kind)
    sampled = _means(model, sampler.latents(CALIBRATION_SAMPLES, seed))
    cal = calibrate_gain(sampled, d, images, seed=seed, bounds=(1.0, 1.0) if kind == "sky" else GAIN_BOUNDS)
    d["spectrum"] = d["spectrum"] * cal["gain"] ** 2  # the gain on the residual, folded in
    sampler.tensors.update({f"detail_{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()})
    return {"kind": kind, "k_min": k_min(model.config.image_size),
            "variance_coef": [float(c) for c in d["variance_coef"]], "gain": cal["gain"],
            "power_deficit_dex_at_gain_1": cal["deficit_dex_at_1"], "power_deficit_dex": cal["deficit_dex"]}


def _add_properties(tensors: dict[str, torch.Tensor], meta: dict[str, Any], images: np.ndarray) -> None:
    """Measure every training image once and keep the values with the kernels (one row per
    image; kernel k is image k mod N): what --where selects by and /info shows the ranges of."""
    tensors["image_properties"] = torch.from_numpy(np.ascontiguousarray(measure_properties(images)))
    meta["properties"] = list(PROPERTY_NAMES)


def same_encoder(a: ConvVAE, b: ConvVAE) -> bool:
    """Whether two models map every image to the same code (their encoders' weights are equal)."""
    sa, sb = ([m.state_dict() for m in net.encoder_modules()] for net in (a, b))
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(sa, sb))


def _reused_codes(model: ConvVAE, codes_from: str, images: np.ndarray, batch_size: int,
                  keep_detail: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], np.ndarray]:
    """The mixture and kernels of the sampler in ``codes_from``, whose model has the same encoder
    (a fine-tuned decoder's likelihood model): what :func:`fit_codes` would fit again, at no cost.
    ``keep_detail`` keeps its residual detail model too (the critic trained the decoder with it)."""
    source = load_model_dir(codes_from)
    old = read_sampler(codes_from, source.sha256)
    if old is None or not same_encoder(model, source.model):
        raise SamplerError(f"{codes_from} has no sampler fitted to the same encoder; fit this one anew")
    tensors = {k: v for k, v in old.tensors.items() if keep_detail or not k.startswith("detail_")}
    drop = ("model_sha256",) if keep_detail else ("detail", "model_sha256")
    meta = {k: v for k, v in old.meta.items() if k not in drop}
    mu = None if keep_detail else encode_means(model, images, batch_size)  # the detail fit's codes
    return tensors, {**meta, "codes_from": codes_from}, mu


def _take_over(model_dir: str, md: ModelDir, codes_from: str, batch_size: int) -> dict[str, Any]:
    """The sampler of ``codes_from`` (same encoder), residual detail included, as this model's."""
    tensors, meta, _ = _reused_codes(md.model, codes_from, np.zeros((0,)), batch_size, True)
    sampler = MixtureSampler(tensors, {**meta, "model_sha256": md.sha256})
    if sampler.meta.get("detail"):
        sampler.meta["detail"] = {**sampler.meta["detail"], "kept": True}
    save_sampler(model_dir, sampler)
    return sampler.meta


def _training_images(model_dir: str, md: ModelDir, source: str, crop: float | None, max_images: int,
                     seed: int, labels: str | None) -> tuple[np.ndarray, list | None, str | None]:
    """The images (and their labels, and where those came from) the sampler is fitted to: the
    training split when ``source`` is what the model trained on."""
    tcfg = md.train_config
    if not source:
        raise SamplerError(f"{model_dir}: no training data recorded or readable; pass --train-data")
    split = "train" if same_source(source, tcfg.get("data", "")) else None
    found = read_image_set(source, md.model_config.image_size, crop or float(tcfg.get("crop", 1.0)),
                           limit=max_images, split=split, val_fraction=float(tcfg.get("val_fraction", 0.1)),
                           seed=seed, labels=labels)
    return found.images, found.labels, found.info.get("labels_source")


def fit_sampler(model_dir: str, train_data: str | None = None, components: int = GMM_COMPONENTS,
                covariance: str = "full", seed: int = 0, crop: float | None = None,
                max_images: int = 5000, images: np.ndarray | None = None, batch_size: int = 64,
                detail: bool | str = True, orientations: int = SAMPLER_ORIENTATIONS,
                bandwidth: float = KERNEL_BANDWIDTH, labels: str | None = None,
                image_labels: Sequence[str | None] | None = None,
                codes_from: str | None = None, keep_detail: bool = False) -> dict[str, Any]:
    """Fit the two-stage sampler to a model's training images; write sampler.pt + sampler.json.

    ``train_data`` defaults to the model's recorded training data (its training split);
    ``images`` (uint8, already at the model's size) skips reading. With ``bandwidth`` > 0 draws
    come from kernels on the codes, 0 draws from the mixture's components; with kernels, every
    training image's properties are measured and kept with them (``--where``). With ``detail``
    the residual detail model is fitted too. Returns sampler.json's content.

    Fitted per label when the images have classes: from the ``labels`` CSV (default: the one
    training recorded, ``train.labels``), else from prepared shards that store them, or
    ``image_labels`` (one class or None per image) alongside ``images``.

    ``detail``: the residual detail model's kind (:data:`ray_galaxy.generation.detail.DETAIL_KINDS`;
    True is "galaxy"), or False/"none" for none.

    ``codes_from``: a model directory whose model has the same encoder (the likelihood model a
    decoder was fine-tuned from): its mixture and kernels are taken over instead of fitted again,
    and only the residual detail is fitted to this model's decoder; with ``keep_detail`` that
    model's detail is kept as well, and nothing is fitted.
    """
    # settings first: a typo fails at once, not after the images are read and encoded
    check_fit_arguments(covariance, orientations, bandwidth)
    kind = "galaxy" if detail is True else detail
    if kind not in (*DETAIL_MODES, False, None):
        raise ValueError(f"detail must be one of {', '.join(DETAIL_MODES)}, got {detail!r}")
    md = load_model_dir(model_dir)
    tcfg = md.train_config
    source = train_data or recorded_train_data(tcfg)
    if codes_from and keep_detail:  # nothing to fit: no images needed
        return _take_over(model_dir, md, codes_from, batch_size)
    if images is None:
        images, image_labels, labels = _training_images(model_dir, md, source, crop, max_images, seed,
                                                        labels or tcfg.get("labels") or None)
    elif labels is not None and image_labels is None:
        raise ValueError("a labels CSV matches images by file name: with images= pass image_labels instead")
    if image_labels is not None:
        log(describe_labels(image_labels, labels or "image_labels"))
    try:
        if codes_from:
            tensors, meta, mu = _reused_codes(md.model, codes_from, images, batch_size, False)
        else:
            tensors, meta, mu = fit_codes(md.model, images, components, covariance, seed, orientations,
                                          bandwidth, batch_size, labels=image_labels)
    except (ValueError, np.linalg.LinAlgError) as e:
        raise SamplerError(f"{model_dir}: the latent mixture could not be fitted to the codes of {len(images)} "
                           f"training images ({e}); fit fewer components (--components) or train on more "
                           "images") from e
    if "kernel_codes" in tensors and not codes_from:  # taken-over kernels keep their own properties
        _add_properties(tensors, meta, images)
    sampler = MixtureSampler(tensors, {**meta, "train_data": source, "labels_source": labels,
                                       "model_sha256": md.sha256})
    try:
        sampler.meta["detail"] = _detail(md.model, sampler, images, mu, seed, kind) if kind in DETAIL_KINDS else None
    except (ValueError, np.linalg.LinAlgError) as e:
        raise SamplerError(f"{model_dir}: the residual detail model could not be fitted ({e}); fit without it "
                           "(jobs/fit_sampler.py --no-detail: decoder means only) or train the model longer") from e
    save_sampler(model_dir, sampler)
    return sampler.meta
