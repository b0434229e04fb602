"""The two-stage sampler: a density fitted to the training codes replaces the N(0, I) prior.

Two-stage sampling (Dai & Wipf 2019, "Diagnosing and Enhancing VAE Models"; Ghosh et al. 2020,
"From Variational to Deterministic Autoencoders", ex-post density estimation): with a small KL
weight the aggregate posterior q(z) is far from N(0, I), and prior samples land where the
decoder has seen nothing. A Gaussian mixture (scikit-learn's ``GaussianMixture``, fitted by EM)
is fitted to the posterior means of the training images in all 8 D4 orientations (training
augments with D4, so all eight are codes the decoder knows).

By default the draws come from a second mixture built on the first: one Gaussian kernel per
training code, shaped like the covariance of the component that code belongs to and shrunk by a
bandwidth (a smoothed bootstrap, Silverman 1986, section 6.4.2, with locally shaped kernels as
in Manifold Parzen windows, Vincent & Bengio 2003). The broad components put mass between
galaxies whose decodes are blends; kernels stay near codes the decoder was trained on, while
the bandwidth keeps samples as far from the training images as new galaxies are
(docs/model.md, "Two-stage sampler").

Fitted per label (conditional generation): when the training images have classes
(:mod:`ray_galaxy.labels`), every kernel carries its image's class (``kernel_label``, an index
into ``meta["labels"]``; -1 unlabelled), and a draw for a class picks its kernel uniformly among
that class's kernels only: the class's own kernel density, each kernel shaped by the shared
mixture. Without kernels (bandwidth 0) a draw for a class picks a random code of that class and
draws from that code's component. Unconditional draws are the same with or without labels.

By property (``where``): the fit also measures every training image once
(:mod:`ray_galaxy.generation.properties`; ``image_properties``, one row per image), and a draw
with a ``where`` selection picks its kernel uniformly among the kernels of the training galaxies
that satisfy it (and are of ``label``, when both are given), exactly as a class's draw does.
This needs kernels: a sampler without them, or fitted before properties were kept, says to refit.

On disk, next to the model: ``sampler.pt`` (tensors only) and ``sampler.json`` (written last).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ray_galaxy.checkpoint import ModelDirError, load_tensors, tensor_bytes
from ray_galaxy.generation.properties import property_ranges, selected_images
from ray_galaxy.generation.where import WhereError
from ray_galaxy.images import D4, orient
from ray_galaxy.model import ConvVAE
from ray_galaxy.storage import join, read_bytes, write_bytes

SAMPLER_FILE = "sampler.pt"
SAMPLER_META = "sampler.json"
GMM_COMPONENTS = 40
SAMPLER_ORIENTATIONS = 8
# scikit-learn's tolerance on the gain of the mean log-likelihood per code (its default): on
# GZ2's 10,056 codes of 64 dimensions EM stops after about 100 iterations.
SAMPLER_EM_TOL = 1e-3
COVARIANCE_REG = 1e-6  # added to every covariance diagonal so it stays positive definite
COVARIANCES = ("full", "diag")
# Kernel bandwidth, chosen on training data only (GZ2, three training runs; docs/model.md):
# 0.25 / 0.35 / 0.45 put samples 0.89-0.92 / 0.92-0.95 / 0.95-0.97 times as far from the
# training images as the job's own held-out galaxies (the memorisation ratio; the broad
# components: 1.02-1.03). 0.45 is the smallest with samples about 0.95 as novel as new galaxies.
KERNEL_BANDWIDTH = 0.45
MAX_SELECTIONS = 64  # (label, where) kernel selections kept per sampler: a request reuses its rows


class SamplerError(ModelDirError):
    """The requested sampler is missing from the model directory or does not match it."""


class LabelError(ValueError):
    """A class was asked of a sampler (or model) that does not have it; the message lists the valid ones."""


def fit_mixture(x: np.ndarray, components: int = 10, covariance: str = "full", seed: int = 0,
                tol: float = SAMPLER_EM_TOL, max_iter: int = 500) -> dict[str, Any]:
    """Fit a Gaussian mixture to the rows of ``x`` (scikit-learn, k-means++ initialisation).

    Returns weights (K,), means (K, D), covariances (K, D, D) (diagonal matrices for 'diag'),
    the component of each row (most responsible), the mean log-likelihood per row, the EM
    iterations run and whether EM converged.
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    # Imported here, not at the top: only fitting needs scikit-learn, and its ~1 s of import
    # would otherwise delay every process that only draws from a fitted sampler (each Serve
    # replica, each catalogue actor, every job's start).
    from sklearn.mixture import GaussianMixture

    x = np.asarray(x, np.float64)
    k = max(1, min(components, len(x)))
    gm = GaussianMixture(k, covariance_type=covariance, tol=tol, reg_covar=COVARIANCE_REG,
                         max_iter=max_iter, init_params="k-means++", random_state=seed)
    gm.fit(x)
    covs = gm.covariances_
    if covariance == "diag":
        covs = np.stack([np.diag(c) for c in covs])
    return {"weights": gm.weights_, "means": gm.means_, "covariances": covs,
            "component": gm.predict(x), "log_likelihood": float(gm.score(x)),
            "iterations": int(gm.n_iter_), "converged": bool(gm.converged_)}


@dataclass
class MixtureSampler:
    """A fitted two-stage sampler: mixture tensors, optional kernels and residual detail, meta."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        # Factorised once per load: every draw needs them (40 x 64 x 64 on GZ2).
        self._chol = torch.linalg.cholesky(self.tensors["covariances"].double())
        # The kernels (codes) of each class, found once: a draw for a class picks among them.
        kl = self.tensors.get("kernel_label")
        self._rows = {name: torch.nonzero(kl == i)[:, 0] for i, name in enumerate(self.labels)} \
            if kl is not None else {}
        self._selections: dict[tuple[str | None, str], torch.Tensor] = {}

    @property
    def latent_dim(self) -> int:
        return int(self.tensors["means"].shape[1])

    @property
    def labels(self) -> list[str]:
        """The classes it can draw from (sorted), empty when fitted without labels."""
        return list(self.meta.get("labels") or [])

    @property
    def properties(self) -> dict[str, np.ndarray] | None:
        """{property: (N,) values of the N training galaxies}, None when it was fitted without
        them (before they were kept, or without kernels)."""
        values, names = self.tensors.get("image_properties"), self.meta.get("properties")
        if values is None or not names or "kernel_codes" not in self.tensors:
            return None
        return {name: values[:, i].double().numpy() for i, name in enumerate(names)}

    def property_ranges(self) -> dict[str, dict[str, Any]] | None:
        """{property: {min, median, max, unit, measured}} over the training galaxies, or None."""
        if self.properties is None:
            return None
        return property_ranges(self.meta["properties"], self.tensors["image_properties"].double().numpy())

    def property_problem(self) -> str | None:
        """Why draws cannot be selected by property (``where``), None when they can."""
        if "kernel_codes" not in self.tensors:
            return ("where needs a sampler with kernels (fitted with --bandwidth > 0), and this one draws from "
                    "mixture components")
        if self.properties is None:
            return ("where needs the training galaxies' properties, and this sampler was fitted without them "
                    "(before they were kept)")
        images = len(self.tensors["image_properties"])
        if images == 0 or len(self.tensors["kernel_codes"]) % images:
            return f"{SAMPLER_FILE} has {images} property rows for {len(self.tensors['kernel_codes'])} kernels"
        return None

    def kernel_rows(self, label: str | None = None, where: str | None = None) -> torch.Tensor | None:
        """The kernels a draw picks among: those of class ``label`` whose training galaxy
        satisfies ``where`` (:mod:`ray_galaxy.generation.where`); None for all of them.
        :class:`LabelError` for an unknown class, :class:`WhereError` for a bad or too narrow
        selection or a sampler without properties."""
        if label is not None and label not in self._rows:
            raise LabelError(f"unknown label {label!r}; valid labels are: {', '.join(self.labels)}"
                             if self.labels else "this sampler was fitted without labels")
        if where is None:
            return self._rows[label] if label is not None else None
        if (label, where) not in self._selections:
            problem = self.property_problem()
            if problem:
                raise WhereError(f"{problem}; refit the sampler (jobs/fit_sampler.py)")
            images = len(self.tensors["image_properties"])
            orientations = len(self.tensors["kernel_codes"]) // images
            among = None if label is None else (self.tensors["kernel_label"][:images] ==
                                                self.labels.index(label)).numpy()
            mask = selected_images(where, self.properties, among, f" of class {label!r}" if label else "",
                                   orientations)
            if len(self._selections) >= MAX_SELECTIONS:
                self._selections.pop(next(iter(self._selections)))
            self._selections[label, where] = torch.nonzero(torch.from_numpy(np.tile(mask, orientations)))[:, 0]
        return self._selections[label, where]

    def selected_images(self, label: str | None = None, where: str | None = None) -> np.ndarray | None:
        """(N,) bool over the training galaxies: those a draw for (``label``, ``where``) may start
        from (:meth:`kernel_rows`, whose errors it raises); None for all of them."""
        rows = self.kernel_rows(label, where)
        if rows is None:
            return None
        images = len(self.tensors["image_properties"])
        mask = np.zeros(images, bool)
        mask[rows[rows < images].numpy()] = True  # kernel k is image k mod N, orientation by orientation
        return mask

    def around_kernels(self, kernels: torch.Tensor, eps: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(n, D) codes: kernel ``kernels[i]``'s code plus the noise ``eps[i]`` (n, D standard
        normal, float64) shaped by its component's covariance times the bandwidth and
        ``temperature``: what :meth:`latents` draws once it has picked its kernels."""
        t = self.tensors
        centre = t["kernel_codes"][kernels].double()
        scale = temperature * float(t["kernel_bandwidth"])
        return (centre + scale * (self._chol[t["kernel_component"][kernels]] @ eps[..., None])[..., 0]).float()

    @property
    def detail(self) -> dict[str, torch.Tensor] | None:
        """The residual detail model (:mod:`ray_galaxy.generation.detail`), None without one."""
        d = {k[len("detail_"):]: v for k, v in self.tensors.items() if k.startswith("detail_")}
        return d or None

    def latents(self, n: int, seed: int = 0, temperature: float = 1.0, label: str | None = None,
                where: str | None = None) -> torch.Tensor:
        """(n, D) codes by seed: a uniformly chosen training code plus noise shaped by its
        component's covariance times the bandwidth (with kernels), else a component by weight
        plus noise shaped by its covariance. ``temperature`` scales the noise. With ``label``
        the code is chosen among that class's codes only (without kernels: the component of
        such a code), with ``where`` among the codes of the training galaxies that satisfy it
        (:meth:`kernel_rows` says when it cannot)."""
        t = self.tensors
        rows = self.kernel_rows(label, where)
        g = torch.Generator().manual_seed(int(seed))
        if "kernel_codes" in t:
            pick = (rows[torch.randint(len(rows), (n,), generator=g)] if rows is not None
                    else torch.randint(len(t["kernel_codes"]), (n,), generator=g))
            return self.around_kernels(pick, torch.randn(n, self.latent_dim, generator=g, dtype=torch.float64),
                                       temperature)
        if rows is not None:  # a class without kernels: the component of one of its codes
            comp = t["kernel_component"][rows[torch.randint(len(rows), (n,), generator=g)]]
        else:
            comp = torch.multinomial(t["weights"].double(), n, replacement=True, generator=g)
        eps = torch.randn(n, self.latent_dim, generator=g, dtype=torch.float64)
        return (t["means"].double()[comp] + temperature * (self._chol[comp] @ eps[..., None])[..., 0]).float()

    def variance(self) -> np.ndarray:
        """Per-dimension variance of the mixture (law of total variance): how much each latent
        dimension varies across the training codes."""
        w = self.tensors["weights"].double().numpy()
        means = self.tensors["means"].double().numpy()
        var = np.einsum("kii->ki", self.tensors["covariances"].double().numpy())
        return w @ (var + means ** 2) - (w @ means) ** 2

    def mean_code(self) -> torch.Tensor:
        """The mixture's mean code, (D,)."""
        w = self.tensors["weights"].double()
        return (w[:, None] * self.tensors["means"].double()).sum(0).float()

    def summary(self) -> dict[str, Any]:
        """What a person wants to know about it (Serve's /info, reports)."""
        return {**{k: self.meta.get(k) for k in ("kind", "components", "covariance", "kernels", "bandwidth")},
                "labels": self.labels, "properties": list(self.meta.get("properties") or [])}


@torch.no_grad()
def encode_means(model: ConvVAE, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Posterior means mu(x) of (N, S, S, 3) uint8 images: (N, latent_dim) float64."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2).float() / 255
        # The model may sit on a GPU (a Serve decoder replica); the images come from the CPU.
        out.append(model.encode(x.to(next(model.parameters()).device))[0].double().cpu().numpy())
    return np.concatenate(out)


def _label_tensors(labels: Sequence[str | None], n_images: int, orientations: int
                   ) -> tuple[torch.Tensor, list[str], dict[str, int]]:
    """Per-code class index (-1: unlabelled; the codes are the images in each orientation in
    turn), the sorted classes and images per class."""
    if len(labels) != n_images:
        raise ValueError(f"labels must give one class (or None) per image: {len(labels)} for {n_images} images")
    classes = sorted({label for label in labels if label is not None})
    if not classes:
        raise ValueError("labels were given but no image has one")
    index = {c: i for i, c in enumerate(classes)}
    per_image = torch.tensor([index[label] if label is not None else -1 for label in labels], dtype=torch.int64)
    counts = {c: sum(label == c for label in labels) for c in classes}
    return per_image.repeat(orientations), classes, counts


def check_fit_arguments(covariance: str, orientations: int, bandwidth: float) -> None:
    """Raise ValueError naming the first of a sampler fit's settings that is out of range."""
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    if not 1 <= orientations <= len(D4):
        raise ValueError(f"orientations must be in 1..{len(D4)}, got {orientations}")
    if not (bandwidth >= 0 and math.isfinite(bandwidth)):
        raise ValueError(f"bandwidth must be a finite number >= 0, got {bandwidth}")


def fit_codes(model: ConvVAE, images: np.ndarray, components: int = GMM_COMPONENTS,
              covariance: str = "full", seed: int = 0, orientations: int = SAMPLER_ORIENTATIONS,
              bandwidth: float = KERNEL_BANDWIDTH, batch_size: int = 64,
              labels: Sequence[str | None] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any], np.ndarray]:
    """Fit the mixture (and kernels) to the codes of ``images`` in their first ``orientations``
    D4 elements. Returns the tensors, their description and the orientation-0 codes (N, D).

    ``labels`` (one class or None per image) makes it a per-label sampler: every code keeps its
    image's class (``kernel_label``), ``meta["labels"]`` lists the classes. The mixture is
    fitted to all codes either way, so unconditional draws do not change."""
    check_fit_arguments(covariance, orientations, bandwidth)
    labelled = _label_tensors(labels, len(images), orientations) if labels is not None else None
    mu = encode_means(model, images, batch_size)
    codes = np.concatenate([mu] + [encode_means(model, orient(images, o), batch_size)
                                   for o in range(1, orientations)])  # (orientations * N, D)
    gmm = fit_mixture(codes, components, covariance, seed)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(gmm[k])) for k in ("weights", "means", "covariances")}
    if bandwidth > 0 or labelled is not None:  # a class's draws need each code's component
        tensors["kernel_component"] = torch.from_numpy(gmm["component"].astype(np.int64))
    if bandwidth > 0:
        tensors.update({"kernel_codes": torch.from_numpy(np.ascontiguousarray(codes, np.float32)),
                        "kernel_bandwidth": torch.tensor(float(bandwidth), dtype=torch.float64)})
    if labelled is not None:
        tensors["kernel_label"] = labelled[0]
    meta = {"format": 2, "kind": "gmm", "components": int(len(gmm["weights"])), "covariance": covariance,
            "kernels": "codes" if bandwidth > 0 else "components", "bandwidth": float(bandwidth),
            "seed": seed, "train_images": int(len(images)), "orientations": orientations,
            "codes": int(len(codes)), "mean_log_likelihood": gmm["log_likelihood"],
            "iterations": gmm["iterations"], "converged": gmm["converged"],
            "latent_dim": int(codes.shape[1]),
            "labels": labelled[1] if labelled else [], "label_counts": labelled[2] if labelled else {},
            "unlabelled_images": sum(label is None for label in labels) if labelled else None}
    return tensors, meta, mu


def save_sampler(model_dir: str, sampler: MixtureSampler) -> None:
    """Write sampler.pt, then sampler.json (the marker that it is complete)."""
    write_bytes(join(model_dir, SAMPLER_FILE), tensor_bytes(sampler.tensors))
    write_bytes(join(model_dir, SAMPLER_META), json.dumps(sampler.meta, indent=1).encode())


def read_sampler(model_dir: str, model_sha256: str) -> MixtureSampler | None:
    """The sampler of a model directory, None if it has none.

    Raises :class:`SamplerError` when it was fitted to another model.pt (the model was retrained).
    """
    try:
        meta = json.loads(read_bytes(join(model_dir, SAMPLER_META)))
    except (FileNotFoundError, OSError):
        return None
    if meta.get("model_sha256") != model_sha256:
        raise SamplerError(f"{model_dir}: {SAMPLER_FILE} was fitted to a different model.pt; refit it "
                           "(jobs/fit_sampler.py or jobs/evaluate.py --fit-sampler)")
    tensors = load_tensors(read_bytes(join(model_dir, SAMPLER_FILE)), join(model_dir, SAMPLER_FILE))
    return MixtureSampler(tensors, meta)
