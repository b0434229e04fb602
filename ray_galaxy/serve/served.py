"""One model behind the HTTP ingress: :class:`ServedModel`.

It loads the model directory without its weights (:meth:`Generator.load` with
``weights=False``: config, metrics, version and sampler), so it draws the same codes for a
seed as every other way of making galaxies, and calls the ``Decoder`` through a
:class:`DeploymentHandle` (with the model's name as Serve's multiplexed model ID when the
application serves several), retrying while no decoder replica is available.

Redeploying with a new model URI replaces the replicas with a rolling update, so for a while
an old ingress may meet a new decoder (or the other way round): :meth:`ServedModel.run` then
rebuilds the request for the decoder's model, so the request is still served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Mapping

import numpy as np
import ray.exceptions
from ray.serve.exceptions import RayServeException

from ray_galaxy.config import ModelConfig
from ray_galaxy.generation.generator import Generator, LabelError
from ray_galaxy.generation.where import WhereError
from ray_galaxy.generation.latents import most_active_dims, prior_latents
from ray_galaxy.serve.config import DECODER_RETRY_S, MAX_N, ServeConfig
from ray_galaxy.serve.errors import ApiError

logger = logging.getLogger("ray.serve")

Build = Callable[[ModelConfig], np.ndarray]


def metrics_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar training metrics worth showing in /info (best epoch, data counts)."""
    best = metrics.get("best") or {}
    keys = ("epoch", "train_loss", "val_loss", "val_recon", "val_kl", "val_psnr", "val_bpd",
            "decoder_sigma")
    data = metrics.get("data") or {}
    return {
        "best_epoch": metrics.get("best_epoch"),
        "epochs_run": metrics.get("epochs_run"),
        "best": {k: best[k] for k in keys if isinstance(best.get(k), (int, float))},
        "data": {k: data[k] for k in ("source", "train_images", "val_images", "skipped") if k in data},
    }


def default_traverse_dims(metrics: Mapping[str, Any], latent_dim: int) -> tuple[int, int] | None:
    """The two latent dims the training run drew its traversal with, else the most active."""
    dims = metrics.get("traversal_dims")
    if isinstance(dims, list) and len(dims) == 2 and all(isinstance(d, int) for d in dims) \
            and dims[0] != dims[1] and all(0 <= d < latent_dim for d in dims):
        return int(dims[0]), int(dims[1])
    kl = (metrics.get("best") or {}).get("val_kl_per_dim")
    if isinstance(kl, list) and len(kl) == latent_dim and latent_dim >= 2:
        a, b = most_active_dims(kl, 2)
        return a, b
    return (0, 1) if latent_dim >= 2 else None


def _retry_later(message: str) -> ApiError:
    return ApiError(503, message, None, {"Retry-After": "5"})


class ServedModel:
    """A model of the application as the routes see it: its codes, its decoder calls, /info."""

    def __init__(self, name: str, uri: str, config: ServeConfig, decoder: Any, auth: bool) -> None:
        self.name, self.uri, self.config, self.auth = name, uri, config, auth
        # Several models: the name routes the call to a decoder replica that holds the model
        # (Serve's model multiplexing). One model: no ID, the decoder serves its only one.
        self.decoder = decoder.options(multiplexed_model_id=name) if config.multiplexed else decoder
        self.gen = Generator.load(uri, weights=False)
        if self.gen.sampler is None:
            logger.warning("serving %s without a fitted sampler: %s", uri, self.gen.sampler_problem)
        self.model_config = self.gen.model_config
        self.latent_dim = self.model_config.latent_dim
        self.traverse_dims = default_traverse_dims(self.gen.model_dir.metrics, self.latent_dim)
        crop = self.gen.model_dir.train_config.get("crop", 1.0)
        self.crop = float(crop) if isinstance(crop, (int, float)) and 0 < crop <= 1 else 1.0

    @property
    def version(self) -> str:
        return self.gen.version

    # ------------------------------------------------------------------ codes
    def latents(self, cfg: ModelConfig, n: int, seed: int, temperature: float,
                sampler: str = "auto", label: str | None = None, where: str | None = None) -> np.ndarray:
        """(n, latent_dim) codes of ``cfg``'s model for ``seed``, from the prior or the sampler:
        the codes of jobs/sample.py's first ``n`` galaxies of that seed (of class ``label``, from
        training galaxies satisfying ``where``)."""
        if self.gen.resolve(sampler) == "gmm" and self.gen.sampler is None:
            raise ApiError(422, f"sampler: this model has no GMM sampler ({self.gen.sampler_problem}); "
                                "use 'prior' or fit one with jobs/fit_sampler.py", "sampler")
        try:
            self.gen.check_label(label, sampler)
        except LabelError as e:
            raise ApiError(422, f"label: {e}", "label") from None
        try:
            self.gen.check_where(where, sampler, label)
        except WhereError as e:
            raise ApiError(422, str(e), "where") from None
        if cfg == self.model_config:
            return self.gen.latents(n, seed, sampler, temperature, label=label, where=where).numpy()
        # Mid-swap, rebuilt for the decoder's new model: its sampler is not loaded here.
        if sampler == "gmm" or label is not None or where is not None:
            raise ApiError(503, "sampler: the model is being replaced; retry", "sampler")
        return prior_latents(cfg.latent_dim, n, seed, temperature).numpy()

    def detail_seed(self, cfg: ModelConfig, sampler: str, detail: bool, seed: int) -> int | None:
        """The residual detail's seed for a /sample request, None for the decoder's means (and
        for a request rebuilt for another model, whose sampler this replica does not have)."""
        return self.gen.detail_seed(sampler, detail, seed) if cfg == self.model_config else None

    # ------------------------------------------------------------------ decoder calls
    async def _call(self, method: str, arg: Any, deadline: float) -> dict[str, Any]:
        """One decoder call, retried while no replica is available; 503 past ``deadline``."""
        delay = 0.05
        while True:
            try:
                return await getattr(self.decoder, method).remote(arg)
            except (RayServeException, ray.exceptions.RayActorError) as e:
                reason = f"{type(e).__name__}: {e}"
            if time.monotonic() + delay > deadline:
                raise _retry_later(f"decoder unavailable: {reason}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _send(self, method: str, data: np.ndarray, noise: int | None,
                    deadline: float) -> list[dict[str, Any]]:
        """``data`` to the decoder: latent rows in chunks of at most max_batch_size."""
        if method != "decode":
            return [await self._call(method, data, deadline)]
        step = self.config.max_batch_size
        calls = [self._call("decode", data[i:i + step] if noise is None else
                            {"z": data[i:i + step], "detail_seed": noise, "offset": i}, deadline)
                 for i in range(0, len(data), step)]
        if len(calls) == 1:  # a single galaxy: no task for gather to wrap it in
            return [await calls[0]]
        return await asyncio.gather(*calls)

    def _rebuild(self, build: Build, answer: Mapping[str, Any], cfg: ModelConfig
                 ) -> tuple[np.ndarray | None, ModelConfig]:
        """After a mismatch answer: the input rebuilt for the decoder's model (None when the
        decoder's model is the one already built for, or when that decoder does not serve this
        model at all: wait for a matching replica)."""
        if answer.get("model_config") is None:
            return None, cfg
        other = ModelConfig.from_dict(answer["model_config"])
        if other == cfg:
            return None, cfg
        logger.info("decoder %s serves another model (%s); rebuilding the request for it",
                    answer["version"], answer["mismatch"])
        try:
            return build(other), other
        except (ApiError, ValueError):
            raise _retry_later("the model is being replaced and this request does not fit the new one; "
                               "retry") from None

    async def run(self, build: Build, method: str = "decode",
                  detail_seed: Callable[[ModelConfig], int | None] | None = None) -> tuple[np.ndarray, str]:
        """Decoder input built by ``build(model_config)`` -> (uint8 images, model version(s)).

        A decoder of another model answers with its model config, and the input is rebuilt for
        it; one that cannot be (a latent vector of the old length) gets 503 and Retry-After.
        ``detail_seed(cfg)``, when given and not None, asks for draws with residual detail.
        """
        cfg = self.model_config
        data = build(cfg)  # validation errors (422) come from here, against this replica's model
        deadline = time.monotonic() + DECODER_RETRY_S
        delay = 0.05
        while True:
            outs = await self._send(method, data, detail_seed(cfg) if detail_seed else None, deadline)
            mismatched = [o for o in outs if "mismatch" in o]
            if not mismatched:
                versions = sorted({o["version"] for o in outs})
                return np.concatenate([o["images"] for o in outs]), ",".join(versions)
            rebuilt, cfg = self._rebuild(build, mismatched[0], cfg)
            data = data if rebuilt is None else rebuilt
            if time.monotonic() + delay > deadline:
                raise _retry_later(f"decoder unavailable: {mismatched[0]['mismatch']}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    # ------------------------------------------------------------------ descriptions
    def summary(self) -> dict[str, Any]:
        """This model's entry in GET /models."""
        return {"name": self.name, "model": self.uri, "version": self.version,
                "latent_dim": self.latent_dim, "image_size": self.model_config.image_size,
                "samplers": self.gen.samplers, "labels": self.gen.labels}

    def info(self) -> dict[str, Any]:
        """What GET /info answers: the model, its version, training metrics, serving settings
        (with the names of every model the application serves)."""
        md, sampler = self.gen.model_dir, self.gen.sampler
        return {
            "model": self.uri,
            "version": self.version,
            "latent_dim": self.latent_dim,
            "image_size": self.model_config.image_size,
            "model_config": self.model_config.to_dict(),
            "train_config": md.train_config,
            "metrics": metrics_summary(md.metrics),
            "traverse_dims": list(self.traverse_dims) if self.traverse_dims else None,
            "name": self.name,
            "dims_by_activity": self.gen.dims_by_activity(),
            "samplers": self.gen.samplers,
            "sampler": sampler.summary() if sampler is not None else None,
            "labels": self.gen.labels,
            "properties": self.gen.property_ranges(),
            "serving": {
                "max_batch_size": self.config.max_batch_size,
                "batch_wait_timeout_s": self.config.batch_wait_timeout_s,
                "max_n": MAX_N,
                "max_body_bytes": self.config.max_body_bytes,
                "auth": self.auth,
                "models": [name for name, _ in self.config.models],
            },
        }
