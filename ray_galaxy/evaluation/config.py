"""Settings of ``jobs/evaluate.py``: each field is also a ``--flag`` and a YAML key."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ray_galaxy.config import ConfigError, _h, check_experiment
from ray_galaxy.evaluation.realism import STEPS
from ray_galaxy.generation.generator import SAMPLERS
from ray_galaxy.generation.match import MATCH_K, MATCH_TRIES
from ray_galaxy.generation.sampler import COVARIANCES, GMM_COMPONENTS, KERNEL_BANDWIDTH


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
    labels: str = _h("CSV of class labels of the training and held-out images for the classes check of a "
                     "model whose sampler has labels (docs/model.md, \"Classes\"); default: the CSV the "
                     "sampler was fitted with, else the model's train.labels.", default="")
    n_per_class: int = _h("Conditional samples drawn per class for the classes check; 0 = n // classes.",
                          default=0)
    class_train: int = _h("At most this many labelled training images fit the classes check's classifier "
                          "(morphology costs ~15 ms an image).", default=2000)
    realism: bool = _h("Run the realism test: a small CNN trained to tell the held-out images from generated "
                        "ones (a classifier two-sample test), for samples, decoder means and two halves of "
                        "the real set (docs/model.md, \"Realism\"); --no-realism skips it.", default=True)
    realism_folds: int = _h("Folds of the realism test (each trains a CNN on the others, tests on it).", default=2)
    realism_steps: tuple[int, ...] = _h("Training budgets of the realism test's CNN (optimiser steps of 32 real + 32 "
                                        "generated images) after which its held-out accuracy is measured; the last is "
                                        "the headline.", default=STEPS)
    properties: bool = _h("Check galaxies to order (docs/properties.md): held-out galaxies' own size, flux, "
                          "ellipticity and colour requested by --match and measured, against the nearest real "
                          "galaxy; and --where selections against the held-out galaxies satisfying them; "
                          "--no-properties skips it.", default=True)
    match_k: int = _h("Nearest training galaxies each request of the properties check draws among (as "
                      "jobs/generate.py --match-k).", default=MATCH_K)
    match_tries: int = _h("Draws made and measured per request of the properties check, the nearest kept (as "
                          "jobs/generate.py --match-tries).", default=MATCH_TRIES)
    where: str = _h("The --where selection the properties check compares with the held-out galaxies that "
                    "satisfy it; default: the upper quartile of the training galaxies' r50_px, ellipticity "
                    "and colour, one at a time.", default="")
    iwae_k: int = _h("Importance samples per image for the IWAE bound.", default=32)
    temperature: float = _h("Scale of the sampler's noise (1 = as fitted).", default=1.0)
    seed: int = _h("Random seed (subsets, samples, IWAE noise); the same seed gives the same report.",
                   default=0)
    batch_size: int = _h("Images per forward pass.", default=64)
    tracking: bool = _h("Add the numbers and figures to the model's MLflow run (from its metrics.json), "
                        "or to a new run when it has none; --no-tracking turns it off.", default=True)
    tracking_uri: str = _h("MLflow tracking server or store for a model without a run of its own; empty: "
                           "$MLFLOW_TRACKING_URI, else sqlite:///<cwd>/runs/mlflow.db.", default="")
    experiment: str = _h("MLflow experiment of a new run.", default="ray-galaxy")

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
        for key in ("n", "max_images", "max_train", "gmm_components", "iwae_k", "batch_size", "match_k", "match_tries"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.n_per_class < 0 or self.class_train < 2:
            raise ConfigError(f"n-per-class must be >= 0 and class-train >= 2, got {self.n_per_class} "
                              f"and {self.class_train}")
        if self.n < 4 or self.max_images < 4:
            raise ConfigError("n and max_images must be at least 4 (distributions need a few images)")
        self.realism_steps = tuple(int(k) for k in self.realism_steps)
        if self.realism_folds < 2 or not self.realism_steps or min(self.realism_steps) < 1:
            raise ConfigError(f"realism-folds must be >= 2 and realism-steps positive, got {self.realism_folds} "
                              f"and {self.realism_steps}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        check_experiment(self.experiment)
        if not (self.gmm_bandwidth >= 0 and math.isfinite(self.gmm_bandwidth)):
            raise ConfigError(f"gmm_bandwidth must be a finite number >= 0, got {self.gmm_bandwidth}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (recorded in metrics.json)."""
        return dict(self.__dict__)
