"""The ``Decoder`` deployment: the models of the application on each replica (CPU or GPU),
decoding latent rows to 8-bit images in dynamic batches.

``@serve.batch`` stacks the rows of concurrent requests into one batch of up to
``max_batch_size`` rows (a request's rows are sent in chunks of at most that many, and
``batch_size_fn`` counts rows, not calls). The decoder runs in float64, so a code gives
byte-identical pixels whatever else shares its batch, and a request gets the same bytes as
``Generator.images`` in any other process.

Several models (``model:`` a list) use Serve's model multiplexing: the ingress names the model
as the request's multiplexed model ID, Serve routes it to a replica that holds that model where
it can, and each replica keeps at most ``max_num_models_per_replica`` models loaded
(``@serve.multiplexed``: least recently used out). Serve splits batches by model ID, so a batch
never mixes models. A request without an ID gets the first model.

``fused: true`` (one model): :class:`InProcessDecoder` runs this same class inside each ingress
replica, called like a deployment handle, so a request skips the hop between actors.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from typing import Any

import numpy as np
import torch
from ray import serve

from ray_galaxy.generation.generator import Generator
from ray_galaxy.generation.sampler import encode_means
from ray_galaxy.serve.config import DECODER, ServeConfig

logger = logging.getLogger("ray.serve")


def _user_code_has_its_own_thread() -> bool:
    """Serve runs a replica's methods on an event loop in a thread of their own unless
    ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`` (Serve's default is on)."""
    return os.environ.get("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1") != "0"


# One decoder call: (latent rows, detail seed or None for the means, the rows' offset in the request).
Item = tuple[np.ndarray, int | None, int]


def _rows(items: list[Item]) -> int:
    """Batch size in latent rows (a call may carry several)."""
    return sum(len(item[0]) for item in items)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class LoadedModel:
    """A model a Decoder replica holds. Serve's multiplexer calls ``__del__`` when it evicts the
    model (the documented hook of ``@serve.multiplexed``), which drops it from ``loaded``."""

    def __init__(self, name: str, gen: Generator, loaded: dict[str, "LoadedModel"]) -> None:
        self.name, self.gen, self._loaded = name, gen, loaded
        loaded[name] = self

    def __del__(self) -> None:
        # Called by the eviction and again when the object is collected: only this very entry.
        if self._loaded.get(self.name) is self:
            del self._loaded[self.name]


@serve.deployment(name=DECODER)
class Decoder:
    """Holds the models; decodes latent rows to uint8 images in dynamic batches."""

    def __init__(self, config: ServeConfig) -> None:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.device = _device(config.device)
        self.uris = dict(config.models)
        self.default = next(iter(self.uris))
        self.loaded: dict[str, LoadedModel] = {}
        # The first model is loaded now: a broken one fails the replica at start, and the first
        # request does not wait for it.
        first = Generator.load(self.uris[self.default], device=self.device)
        self.version = first.version
        if config.multiplexed:
            # Handed to the model cache on its first request for it; until then it counts toward
            # the cache's bound (see _load).
            self._warm, self._model = {self.default: first}, self._multiplexed(config.max_num_models_per_replica)
        else:  # one model, always loaded: no cache to consult
            self._warm, self._model = {}, None
            LoadedModel(self.default, first, self.loaded)
        self.chunk_rows = config.decode_chunk_rows or (1 if self.device == "cpu" else config.max_batch_size)
        self._decode_batch.set_max_batch_size(config.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.stats_counts = {"batches": 0, "rows": 0, "calls": 0, "max_rows": 0, "max_calls": 0, "loads": 0}
        # Decoding on the methods' own loop blocks only that loop: requests arriving meanwhile
        # wait and form the next batch, and Serve's health checks and metrics run on the
        # replica's main loop. A hand-off to a worker thread per batch would cost ~1.4 ms of a
        # ~12 ms single-galaxy request on CPU (docs/benchmarks-history.md). Where user code shares the
        # main loop, the hand-off keeps that loop free.
        self.inline = _user_code_has_its_own_thread()
        logger.info("Decoder ready: models %s (first: %s version %s) on %s (max_batch_size %d)",
                    ", ".join(self.uris), self.uris[self.default], self.version, self.device,
                    config.max_batch_size)

    def _multiplexed(self, max_models: int) -> Any:
        """The replica's model cache: ``await self._model(name)`` -> :class:`LoadedModel`.
        Wrapped here rather than decorated on the class: the bound is a setting."""
        async def load_model(name: str) -> LoadedModel:
            return await self._load(name)

        return serve.multiplexed(max_num_models_per_replica=max_models)(load_model)

    async def _load(self, name: str) -> LoadedModel:
        """Load model ``name`` (Serve has made room for it): the warm first model if it is the
        one, else from its directory, off the event loop."""
        gen = self._warm.pop(name, None)
        if len(self.loaded) + len(self._warm) >= self.config.max_num_models_per_replica:
            self._warm.clear()  # the warm first model would be one too many
        if gen is None:
            gen = await asyncio.to_thread(Generator.load, self.uris[name], device=self.device)
            logger.info("Decoder loaded model %s (%s, version %s)", name, self.uris[name], gen.version)
        self.stats_counts["loads"] += 1
        return LoadedModel(name, gen, self.loaded)

    def _requested(self) -> str:
        """The model this request (or batch: Serve splits batches by model ID) is for."""
        return serve.get_multiplexed_model_id() or self.default

    async def _gen(self, name: str) -> Generator:
        if self._model is None:
            return self.loaded[name].gen
        return (await self._model(name)).gen

    def _decode_now(self, gen: Generator, items: list[Item]) -> list[np.ndarray]:
        """Each item's rows decoded, with residual detail from its seed (rows ``offset``.. of
        that seed's draw, so a request split into chunks gets the bytes of one decoded whole)."""
        return [gen.decode_uint8(rows, seed, offset, batch_size=self.chunk_rows)
                for rows, seed, offset in items]

    async def _run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on this loop where user code has a thread of its own, else in a worker
        thread (see ``self.inline``)."""
        return fn(*args) if self.inline else await asyncio.to_thread(fn, *args)

    def _count(self, parts: list[np.ndarray]) -> None:
        rows, s = sum(len(p) for p in parts), self.stats_counts
        s["batches"] += 1
        s["rows"] += rows
        s["calls"] += len(parts)
        s["max_rows"] = max(s["max_rows"], rows)
        s["max_calls"] = max(s["max_calls"], len(parts))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, batch_size_fn=_rows)
    async def _decode_batch(self, items: list[Item]) -> list[np.ndarray]:
        gen = await self._gen(self._requested())
        parts = await self._run(self._decode_now, gen, items)
        self._count(parts)
        return parts

    def _mismatch(self, gen: Generator, what: str) -> dict[str, Any]:
        """Answer for input shaped for another model (only while a swap to a model with another
        latent_dim or image_size rolls out): the caller rebuilds its input for this model."""
        return {"mismatch": what, "model_config": gen.model_config.to_dict(), "version": gen.version}

    def _unknown(self, name: str) -> dict[str, Any] | None:
        """Answer for a model this replica does not serve (only while a new model list rolls
        out): no config to rebuild for, the caller retries until a replica that has it answers."""
        if name in self.uris:
            return None
        return {"mismatch": f"model {name!r} is not served by this replica", "model_config": None,
                "version": None}

    async def decode(self, z: np.ndarray | dict[str, Any]) -> dict[str, Any]:
        """(k, latent_dim) float32 -> {"images": (k, S, S, 3) uint8, "version"}: the means.

        ``{"z": ..., "detail_seed": S, "offset": o}`` draws from p(x | z) with the sampler's residual
        detail instead (rows o.. of a request seeded S); without a detail model, the means.
        """
        name = self._requested()
        unknown = self._unknown(name)
        if unknown:
            return unknown
        gen = await self._gen(name)
        seed, offset = None, 0
        if isinstance(z, dict):
            seed, offset, z = z.get("detail_seed"), int(z.get("offset", 0)), z["z"]
        z = np.ascontiguousarray(z, dtype=np.float32)
        latent_dim = gen.model_config.latent_dim
        if z.ndim != 2 or z.shape[1] != latent_dim:
            return self._mismatch(gen, f"expected (k, {latent_dim}) latents, got {z.shape}")
        step = self.config.max_batch_size
        if len(z) <= step:  # one chunk (every single-galaxy request): no task for gather to wrap
            return {"images": await self._decode_batch((z, seed, offset)), "version": gen.version}
        parts = await asyncio.gather(*(self._decode_batch((z[i:i + step], seed, offset + i))
                                       for i in range(0, len(z), step)))
        return {"images": np.concatenate(parts), "version": gen.version}

    async def reconstruct(self, image: np.ndarray) -> dict[str, Any]:
        """(S, S, 3) uint8 -> {"images": (1, S, S, 3) uint8, "version"}: the decoded posterior mean.

        Encoding and decoding happen in the same replica, so both use the same model.
        """
        name = self._requested()
        unknown = self._unknown(name)
        if unknown:
            return unknown
        gen = await self._gen(name)
        size = gen.model_config.image_size
        if image.shape != (size, size, 3):
            return self._mismatch(gen, f"expected a {size}px image, got {image.shape}")
        mu = await self._run(encode_means, gen.model, image[None])
        return {"images": await self._decode_batch((mu.astype(np.float32), None, 0)), "version": gen.version}

    def stats(self) -> dict[str, Any]:
        """Batching counters of this replica and the models it holds now (for /models, tests
        and benchmarks)."""
        loaded = sorted(set(self.loaded) | set(self._warm))
        return {"version": self.version, "replica": serve.get_replica_context().replica_id.unique_id,
                "loaded": loaded, **self.stats_counts}


class _Method:
    """One of the in-process decoder's methods, called as a handle's: ``await m.remote(arg)``."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    async def remote(self, *args: Any) -> Any:
        out = self.fn(*args)
        return await out if inspect.isawaitable(out) else out


class InProcessDecoder:
    """The :class:`Decoder` class run inside the calling replica (``ServeConfig.fused``), with a
    handle's call shape: ``await decoder.decode.remote(z)``. Its batching, float64 decoding and
    answers are the Decoder's own; only the hop between actors is gone."""

    def __init__(self, config: ServeConfig) -> None:
        self._decoder = Decoder.func_or_class(config)

    def options(self, **_: Any) -> "InProcessDecoder":
        return self  # one model: nothing to route by

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self._decoder, name))
