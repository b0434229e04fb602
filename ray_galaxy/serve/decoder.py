"""The ``Decoder`` deployment: one :class:`~ray_galaxy.generation.generator.Generator` per
replica (CPU or GPU), decoding latent rows to 8-bit images in dynamic batches.

``@serve.batch`` stacks the rows of concurrent requests into one batch of up to
``max_batch_size`` rows (a request's rows are sent in chunks of at most that many, and
``batch_size_fn`` counts rows, not calls). The decoder runs in float64, so a code gives
byte-identical pixels whatever else shares its batch, and a request gets the same bytes as
``Generator.images`` in any other process.
"""

from __future__ import annotations

import asyncio
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


@serve.deployment(name=DECODER)
class Decoder:
    """Holds the model; decodes latent rows to uint8 images in dynamic batches."""

    def __init__(self, config: ServeConfig) -> None:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.device = _device(config.device)
        self.gen = Generator.load(config.model, device=self.device)
        self.version = self.gen.version
        self.chunk_rows = config.decode_chunk_rows or (1 if self.device == "cpu" else config.max_batch_size)
        self._decode_batch.set_max_batch_size(config.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.stats_counts = {"batches": 0, "rows": 0, "calls": 0, "max_rows": 0, "max_calls": 0}
        # Decoding on the methods' own loop blocks only that loop: requests arriving meanwhile
        # wait and form the next batch, and Serve's health checks and metrics run on the
        # replica's main loop. A hand-off to a worker thread per batch would cost ~1.4 ms of a
        # ~12 ms single-galaxy request on CPU (docs/benchmarks-history.md). Where user code shares the
        # main loop, the hand-off keeps that loop free.
        self.inline = _user_code_has_its_own_thread()
        logger.info("Decoder ready: model %s version %s on %s (max_batch_size %d)",
                    config.model, self.version, self.device, config.max_batch_size)

    def _decode_now(self, items: list[Item]) -> list[np.ndarray]:
        """Each item's rows decoded, with residual detail from its seed (rows ``offset``.. of
        that seed's draw, so a request split into chunks gets the bytes of one decoded whole)."""
        return [self.gen.decode_uint8(rows, seed, offset, batch_size=self.chunk_rows)
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
        parts = await self._run(self._decode_now, items)
        self._count(parts)
        return parts

    def _mismatch(self, what: str) -> dict[str, Any]:
        """Answer for input shaped for another model (only while a swap to a model with another
        latent_dim or image_size rolls out): the caller rebuilds its input for this model."""
        return {"mismatch": what, "model_config": self.gen.model_config.to_dict(), "version": self.version}

    async def decode(self, z: np.ndarray | dict[str, Any]) -> dict[str, Any]:
        """(k, latent_dim) float32 -> {"images": (k, S, S, 3) uint8, "version"}: the means.

        ``{"z": ..., "detail_seed": S, "offset": o}`` draws from p(x | z) with the sampler's residual
        detail instead (rows o.. of a request seeded S); without a detail model, the means.
        """
        seed, offset = None, 0
        if isinstance(z, dict):
            seed, offset, z = z.get("detail_seed"), int(z.get("offset", 0)), z["z"]
        z = np.ascontiguousarray(z, dtype=np.float32)
        latent_dim = self.gen.model_config.latent_dim
        if z.ndim != 2 or z.shape[1] != latent_dim:
            return self._mismatch(f"expected (k, {latent_dim}) latents, got {z.shape}")
        step = self.config.max_batch_size
        if len(z) <= step:  # one chunk (every single-galaxy request): no task for gather to wrap
            return {"images": await self._decode_batch((z, seed, offset)), "version": self.version}
        parts = await asyncio.gather(*(self._decode_batch((z[i:i + step], seed, offset + i))
                                       for i in range(0, len(z), step)))
        return {"images": np.concatenate(parts), "version": self.version}

    async def reconstruct(self, image: np.ndarray) -> dict[str, Any]:
        """(S, S, 3) uint8 -> {"images": (1, S, S, 3) uint8, "version"}: the decoded posterior mean.

        Encoding and decoding happen in the same replica, so both use the same model.
        """
        size = self.gen.model_config.image_size
        if image.shape != (size, size, 3):
            return self._mismatch(f"expected a {size}px image, got {image.shape}")
        mu = await self._run(encode_means, self.gen.model, image[None])
        return {"images": await self._decode_batch((mu.astype(np.float32), None, 0)), "version": self.version}

    def stats(self) -> dict[str, Any]:
        """Batching counters of this replica (for tests and benchmarks)."""
        return {"version": self.version, **self.stats_counts}
