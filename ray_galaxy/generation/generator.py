"""One object that makes galaxies: a model directory loaded once.

:class:`Generator` holds the decoder, the two-stage sampler, its residual detail model and the
model version. Every way out of the project (training's figures, ``jobs/sample.py``, the
evaluation, Serve's decoder replicas and HTTP ingress, the latent explorer) draws codes and
decodes them through it, so the same (sampler, seed) gives the same bytes by construction.

A galaxy is ``decode(latents(n, seed))``: codes from the prior N(0, I) or the fitted sampler,
decoded to the decoder's mean and, for the sampler's draws, with residual detail drawn from
p(x | z) (:mod:`ray_galaxy.generation.detail`) by the same seed.

Conditional generation: a sampler fitted with labels (``jobs/fit_sampler.py --labels CSV``)
draws galaxies of one class (``label=``); galaxy i then depends on (model, sampler, seed, i,
label). :meth:`Generator.check_label` says why a label cannot be used (:class:`LabelError`).

By property: ``where="r50_px >= 6 and ellipticity > 0.5"`` draws only from the kernels of the
training galaxies that satisfy it (:mod:`ray_galaxy.generation.where`, docs/properties.md);
galaxy i then also depends on ``where``. :meth:`Generator.check_where` says why a selection
cannot be used (:class:`WhereError`).

To order: :meth:`Generator.matched_images` makes one galaxy per row of a targets table, drawn
near the training galaxies whose properties are nearest to the row's and kept as the best of a
few measured tries (:mod:`ray_galaxy.generation.match`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ray_galaxy.checkpoint import ModelDir, ModelDirError, load_model_dir
from ray_galaxy.config import ModelConfig
from ray_galaxy.generation.detail import add_detail
from ray_galaxy.generation.latents import SEED_BLOCK, most_active_dims, prior_latents, seeded_rows
from ray_galaxy.generation.match import MATCH_K, MATCH_TRIES, MatchError, Targets, best_tries, match_latents
from ray_galaxy.generation.properties import PROPERTY_NAMES, property_values, robust_spread
from ray_galaxy.generation.sampler import SAMPLER_FILE, LabelError, MixtureSampler, SamplerError, read_sampler
from ray_galaxy.generation.where import WhereError
from ray_galaxy.model import ConvVAE, to_uint8

SAMPLERS = ("auto", "prior", "gmm")


def decode(model: ConvVAE, z: torch.Tensor, batch_size: int = 256, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Codes (N, D) -> the decoder's means (N, 3, S, S) in [0, 1], in chunks of ``batch_size``
    (``dtype``: :meth:`ConvVAE.decode`'s)."""
    return torch.cat([model.decode(z[i:i + batch_size], dtype) for i in range(0, len(z), batch_size)])


class Generator:
    """A model directory loaded once: model, sampler, residual detail and version."""

    def __init__(self, model_dir: ModelDir, sampler: MixtureSampler | None, sampler_problem: str | None):
        self.model_dir = model_dir
        self.sampler = sampler
        self.sampler_problem = sampler_problem

    @classmethod
    def load(cls, uri: str, device: str | torch.device = "cpu", weights: bool = True) -> "Generator":
        """Read the model directory (and its sampler) once. ``weights=False`` loads no network:
        codes and metadata only (the HTTP ingress). A stale or unreadable sampler is left out
        and its reason kept in ``sampler_problem``: the prior still works."""
        md = load_model_dir(uri, device=device, weights=weights)
        try:
            sampler = read_sampler(uri, md.sha256)
            problem = None if sampler is not None else f"the model directory has no {SAMPLER_FILE}"
        except (ModelDirError, OSError, ValueError, KeyError) as e:
            sampler, problem = None, str(e)
        return cls(md, sampler, problem)

    # ------------------------------------------------------------------ what it is
    @property
    def uri(self) -> str:
        return self.model_dir.uri

    @property
    def version(self) -> str:
        return self.model_dir.version

    @property
    def model(self) -> ConvVAE:
        if self.model_dir.model is None:
            raise RuntimeError(f"{self.uri} was loaded without weights (weights=False)")
        return self.model_dir.model

    @property
    def model_config(self) -> ModelConfig:
        return self.model_dir.model_config

    @property
    def samplers(self) -> list[str]:
        """The samplers this model can draw from."""
        return ["prior"] + (["gmm"] if self.sampler is not None else [])

    @property
    def detail(self) -> dict[str, torch.Tensor] | None:
        return self.sampler.detail if self.sampler is not None else None

    @property
    def labels(self) -> list[str]:
        """The classes galaxies can be drawn from (sorted), empty when the sampler has none."""
        return self.sampler.labels if self.sampler is not None else []

    def check_label(self, label: str | None, sampler: str = "auto") -> None:
        """Raise :class:`LabelError` (a ValueError) when galaxies of class ``label`` cannot be
        drawn with ``sampler``; ``label`` None (any class) always can."""
        if label is None:
            return
        if sampler == "prior":
            raise LabelError(f"label {label!r} needs the fitted sampler: the prior N(0, I) has no classes; "
                             "use sampler 'gmm' or 'auto'")
        if self.sampler is None:
            raise LabelError(f"{self.uri} has no usable sampler ({self.sampler_problem}); sampling by class "
                             f"needs one fitted with labels: python jobs/fit_sampler.py --model {self.uri} "
                             "--labels CSV")
        if not self.labels:
            raise LabelError(f"{self.uri} was trained without labels; retrain with --labels CSV to sample by "
                             f"class (or refit its sampler: python jobs/fit_sampler.py --model {self.uri} "
                             "--labels CSV)")
        if label not in self.labels:
            raise LabelError(f"unknown label {label!r}; valid labels are: {', '.join(self.labels)}")

    def property_ranges(self) -> dict[str, dict] | None:
        """{property: {min, median, max, unit, measured}} of the training galaxies the sampler
        keeps (what ``where`` selects by), None without them."""
        return self.sampler.property_ranges() if self.sampler is not None else None

    def _by_property_problem(self, sampler: str, needs: str, select: str) -> str | None:
        """Why galaxies cannot be drawn by their properties from ``sampler`` (None: they can);
        ``needs`` names what asks ('where', 'match'), ``select`` what it does with the galaxies."""
        refit = f"python jobs/fit_sampler.py --model {self.uri}"
        if sampler == "prior":
            return (f"{needs} needs the fitted sampler: the prior N(0, I) has no training galaxies to "
                    f"{select}; use sampler 'gmm' or 'auto'")
        if self.sampler is None:
            return f"{self.uri} has no usable sampler ({self.sampler_problem}); {needs} needs one: {refit}"
        problem = self.sampler.property_problem()
        if problem:
            return f"{problem.replace('where needs', f'{needs} needs', 1)}; refit the sampler: {refit}"
        return None

    def check_where(self, where: str | None, sampler: str = "auto", label: str | None = None) -> None:
        """Raise :class:`WhereError` (a ValueError, one line saying what to change) when galaxies
        cannot be drawn with the selection ``where`` (None: any) from ``sampler``: a bad
        expression, fewer than 20 matching training galaxies, or no properties to select by."""
        if where is None:
            return
        problem = self._by_property_problem(sampler, "where", "select")
        if problem:
            raise WhereError(problem)
        self.sampler.kernel_rows(label, where)

    def check_match(self, sampler: str = "auto") -> None:
        """Raise :class:`MatchError` when galaxies cannot be drawn to order (``--match``) with
        ``sampler``: it needs the fitted sampler's kernels and the training galaxies' properties."""
        problem = self._by_property_problem(sampler, "match", "draw near")
        if problem:
            raise MatchError(problem)

    def matched_latents(self, targets: Targets, n: int, seed: int = 0, start: int = 0, k: int = MATCH_K,
                        temperature: float = 1.0, sampler: str = "auto", label: str | None = None,
                        where: str | None = None, attempt: int = 0) -> tuple[torch.Tensor, np.ndarray]:
        """(codes, training galaxy of each) of rows ``start`` .. ``start + n - 1`` of ``targets``,
        try ``attempt``: each drawn near the ``k`` training galaxies whose properties are nearest
        to its row's (:mod:`ray_galaxy.generation.match`); ``label`` and ``where`` narrow the
        candidates."""
        self.check_match(sampler)
        self.check_label(label, sampler)
        self.check_where(where, sampler, label)
        return match_latents(self.sampler, targets, n, seed, start, k, temperature, label, where, attempt)

    def matched_images(self, targets: Targets, n: int, seed: int = 0, start: int = 0, k: int = MATCH_K,
                       temperature: float = 1.0, sampler: str = "auto", label: str | None = None,
                       where: str | None = None, detail: bool = True, tries: int = MATCH_TRIES,
                       workers: int | None = None) -> tuple[torch.Tensor, np.ndarray, dict[str, np.ndarray]]:
        """(codes (n, D), images (n, S, S, 3) uint8, {property: (n,) as measured on them}) of rows
        ``start`` .. ``start + n - 1`` of ``targets``: of ``tries`` draws of each row (as
        :meth:`matched_latents`), the one measured nearest to its request. ``workers``: processes
        measuring (:func:`ray_galaxy.morphology.measure_all`)."""
        detail_seed = self.detail_seed(sampler, detail, seed)
        codes, images, measured = [], [], []
        for attempt in range(tries):
            z, _ = self.matched_latents(targets, n, seed, start, k, temperature, sampler, label, where, attempt)
            codes.append(z)
            images.append(self.decode_uint8(z, detail_seed, offset=start))
            measured.append(property_values(images[-1], workers))
        cols = [PROPERTY_NAMES.index(name) for name in targets.names]
        spread = robust_spread(np.stack([self.sampler.properties[name] for name in targets.names], axis=1))
        measured_all = np.stack(measured)  # (tries, n, P)
        best = best_tries(targets.values[start:start + n], measured_all[..., cols], spread)
        rows = np.arange(n)
        values = measured_all[best, rows]  # (n, P)
        return (torch.stack(codes)[best, rows], np.stack(images)[best, rows],
                {name: values[:, j] for j, name in enumerate(PROPERTY_NAMES)})

    def dims_by_activity(self) -> list[int]:
        """Latent dimensions, most used first: by the sampler's per-dimension variance when there
        is one, else by the validation KL per dimension (an inactive dimension carries ~0 KL and
        changes nothing when moved), else in index order."""
        d = self.model_config.latent_dim
        score = None
        if self.sampler is not None:
            score = [float(v) for v in self.sampler.variance()]
        else:
            kl = (self.model_dir.metrics.get("best") or {}).get("val_kl_per_dim")
            if isinstance(kl, list) and len(kl) == d \
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for v in kl):
                score = [float(v) for v in kl]
        if score is None or len(score) != d:
            return list(range(d))
        return list(most_active_dims(score, d))

    # ------------------------------------------------------------------ codes
    def resolve(self, sampler: str) -> str:
        """'auto' is the fitted sampler when the model has one (with a small KL weight the prior's
        samples land in holes of the latent space), else the prior."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if sampler == "auto":
            return "gmm" if self.sampler is not None else "prior"
        return sampler

    def latents(self, n: int, seed: int = 0, sampler: str = "auto", temperature: float = 1.0,
                start: int = 0, label: str | None = None, where: str | None = None) -> torch.Tensor:
        """(n, latent_dim) codes of galaxies ``start`` .. ``start + n - 1`` of ``seed``: galaxy i
        depends only on (model, sampler, seed, i, temperature, label, where), not on n
        (:data:`SEED_BLOCK`). ``label``: only galaxies of that class (:meth:`check_label`);
        ``where``: only from training galaxies that satisfy it (:meth:`check_where`)."""
        self.check_label(label, sampler)
        self.check_where(where, sampler, label)
        if self.resolve(sampler) == "prior":
            return prior_latents(self.model_config.latent_dim, n, seed, temperature, start)
        if self.sampler is None:
            raise SamplerError(f"{self.uri}: no usable sampler ({self.sampler_problem}); fit one with "
                               f"`python jobs/fit_sampler.py --model {self.uri}` or use the prior")
        mixture = self.sampler
        return seeded_rows(lambda s: mixture.latents(SEED_BLOCK, s, temperature, label, where), n, seed, start)

    def detail_seed(self, sampler: str, detail: bool, seed: int) -> int | None:
        """The noise seed of residual detail for a request, None for the decoder's means: only the
        fitted sampler's draws get detail, and only when the sampler has a detail model."""
        if not detail or self.detail is None or self.resolve(sampler) != "gmm":
            return None
        return seed

    # ------------------------------------------------------------------ images
    def decode(self, z: torch.Tensor, detail_seed: int | None = None, offset: int = 0,
               batch_size: int = 256) -> torch.Tensor:
        """Codes (k, D) -> (k, 3, S, S) floats in [0, 1]: the decoder's means, plus residual detail
        when ``detail_seed`` is given, the rows being galaxies ``offset``.. of that seed (so a
        request decoded in chunks gets the same bytes as one decoded whole)."""
        means = decode(self.model, torch.as_tensor(z, dtype=torch.float32), batch_size)
        if detail_seed is None or self.detail is None:
            return means
        parts, row = [], 0
        while row < len(means):  # the noise of galaxy i is drawn with its code's block seed
            block, within = divmod(offset + row, SEED_BLOCK)
            k = min(len(means) - row, SEED_BLOCK - within)
            parts.append(add_detail(means[row:row + k], self.detail, seed=detail_seed + block, offset=within))
            row += k
        return torch.cat(parts)

    def generate(self, n: int, seed: int = 0, sampler: str = "auto", temperature: float = 1.0,
                 detail: bool = True, start: int = 0, batch_size: int = 256,
                 label: str | None = None, where: str | None = None) -> torch.Tensor:
        """Galaxies ``start`` .. ``start + n - 1`` of ``seed`` (of class ``label``, from training
        galaxies satisfying ``where``, when given), (n, 3, S, S) floats in [0, 1]."""
        z = self.latents(n, seed, sampler, temperature, start, label, where)
        return self.decode(z, self.detail_seed(sampler, detail, seed), offset=start, batch_size=batch_size)

    def images(self, n: int, seed: int = 0, sampler: str = "auto", temperature: float = 1.0,
               detail: bool = True, start: int = 0, label: str | None = None,
               where: str | None = None) -> np.ndarray:
        """Like :meth:`generate`, as (n, S, S, 3) uint8: what a PNG of them holds."""
        return to_uint8(self.generate(n, seed, sampler, temperature, detail, start, label=label, where=where)).numpy()

    def decode_uint8(self, z: np.ndarray | torch.Tensor, detail_seed: int | None = None,
                     offset: int = 0, batch_size: int = 256) -> np.ndarray:
        """Like :meth:`decode`, as (k, S, S, 3) uint8."""
        return to_uint8(self.decode(torch.as_tensor(z), detail_seed, offset, batch_size)).numpy()
