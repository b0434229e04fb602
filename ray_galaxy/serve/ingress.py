"""The ``GalaxyAPI`` deployment: the HTTP ingress.

It holds one :class:`~ray_galaxy.serve.served.ServedModel` per model of the application (each
loaded without weights: config, metrics, version and sampler), validates every input (a bad
one is a 4xx JSON error naming the field, never a 5xx) and hands each request to the model it
names (``model=NAME``; default: the first), which calls the ``Decoder`` (with ``fused: true``,
one running in this replica).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI
from ray import serve

from ray_galaxy.serve.config import INGRESS, ServeConfig, Token
from ray_galaxy.serve.decoder import InProcessDecoder
from ray_galaxy.serve.errors import ApiError
from ray_galaxy.serve.routes import build_api
from ray_galaxy.serve.served import ServedModel

logger = logging.getLogger("ray.serve")

# How long GET /models waits for a decoder replica to say which models it holds.
REPLICA_STATS_TIMEOUT_S = 5.0


@serve.deployment(name=INGRESS)
@serve.ingress()
class GalaxyAPI:
    """The HTTP API; the FastAPI app is built per replica (its routes reach this instance
    through ``app.state.svc``)."""

    def __init__(self, config: ServeConfig, decoder: Any, token: Token | None = None) -> None:
        # No Decoder deployment (fused: true): the decoder runs in this replica.
        decoder = InProcessDecoder(config) if decoder is None else decoder
        self.config, self.decoder, self.token = config, decoder, token
        self.models = {name: ServedModel(name, uri, config, decoder, token is not None)
                       for name, uri in config.models}
        self.default = next(iter(self.models))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, self.token, self.config.max_body_bytes)

    def pick(self, name: str | None) -> ServedModel:
        """The model a request names (None: the default); 422 listing the valid names."""
        if name is None:
            return self.models[self.default]
        try:
            return self.models[name]
        except KeyError:
            raise ApiError(422, f"model: unknown model {name!r}; valid models are: "
                                f"{', '.join(self.models)}", "model") from None

    async def _replica_models(self) -> dict[str, Any] | None:
        """Which models the decoder replica that answers holds (None when none answers soon)."""
        async def ask() -> dict[str, Any]:
            return await self.decoder.stats.remote()

        try:
            stats = await asyncio.wait_for(ask(), REPLICA_STATS_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the listing stands without it
            logger.info("GET /models: no decoder replica stats (%s: %s)", type(e).__name__, e)
            return None
        return {"replica": stats.get("replica"), "loaded": stats.get("loaded")}

    async def listing(self) -> dict[str, Any]:
        """What GET /models answers: every model (name, location, version, samplers, labels),
        the default, the per-replica bound and the models one decoder replica holds now."""
        return {
            "default": self.default,
            "models": [m.summary() for m in self.models.values()],
            "max_num_models_per_replica": self.config.max_num_models_per_replica,
            "decoder": await self._replica_models(),
        }
