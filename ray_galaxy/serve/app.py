"""The Serve application: ``GalaxyAPI`` (the HTTP ingress) bound to a ``Decoder`` (or, with
``fused: true``, running the decoder in its own replicas).

Start it with ``python jobs/serve.py --model URI [--model URI2 ...]`` or ``serve run
cluster/serve.yaml`` (``import_path: ray_galaxy.serve.app:app_builder``, the :class:`ServeConfig`
fields as ``args``; several models share the app through Serve's model multiplexing).
Redeploying with a new model URI replaces the replicas with a rolling update that starts the
new replicas before the old ones stop (``max_surge_percent: 100``), so no request is dropped.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from ray import serve

from ray_galaxy.config import ConfigError
from ray_galaxy.serve.config import DECODER, DEPLOYMENT_NAMES, INGRESS, ServeConfig, Token, serve_config, split_model
from ray_galaxy.serve.decoder import Decoder
from ray_galaxy.serve.ingress import GalaxyAPI
from ray_galaxy.serve.proxy import HAPROXY_ENV
from ray_galaxy.storage import absolute


def absolute_models(model: str | tuple[str, ...]) -> str | tuple[str, ...]:
    """``model`` with every local path made absolute (replicas may run in another directory),
    names given as NAME=PATH kept."""
    def one(entry: str) -> str:
        name, location = split_model(entry)
        return f"{name}={absolute(location)}" if location != entry else absolute(entry)
    return one(model) if isinstance(model, str) else tuple(one(m) for m in model)


def default_deployment_options(cfg: ServeConfig) -> dict[str, dict[str, Any]]:
    """Per-deployment options used unless cluster/serve.yaml (or the caller) overrides them."""
    return {
        INGRESS: {
            "max_ongoing_requests": 64,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
            "ray_actor_options": {"num_cpus": 0.5},
            "max_surge_percent": 100,
        },
        DECODER: {
            # >= max_batch_size or a batch can never fill.
            "max_ongoing_requests": 2 * cfg.max_batch_size,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                   "target_ongoing_requests": cfg.max_batch_size},
            "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
            "max_surge_percent": 100,
        },
    }


def fused_deployment_options(cfg: ServeConfig) -> dict[str, dict[str, Any]]:
    """``fused: true``: one deployment, the ingress with the decoder's resources and room for a
    batch's worth of requests per replica."""
    split = default_deployment_options(cfg)
    return {INGRESS: {**split[INGRESS], "ray_actor_options": dict(split[DECODER]["ray_actor_options"]),
                      "max_ongoing_requests": max(64, 2 * cfg.max_batch_size)}}


def merge_deployment_options(cfg: ServeConfig, overrides: Mapping[str, Mapping[str, Any]] | None
                             ) -> dict[str, dict[str, Any]]:
    """Defaults with ``overrides`` applied per deployment (each key replaces the default's)."""
    options = fused_deployment_options(cfg) if cfg.fused else default_deployment_options(cfg)
    for name, opts in (overrides or {}).items():
        if name == DECODER and cfg.fused:
            raise ConfigError(f"fused: true runs the decoder inside {INGRESS}: give its options (replicas, "
                              f"resources) under {INGRESS}, not {DECODER}")
        if name not in options:
            raise ConfigError(f"unknown deployment {name!r}; valid names are: {', '.join(DEPLOYMENT_NAMES)}")
        opts = {k: v for k, v in dict(opts).items() if k != "name"}
        if opts.get("num_replicas") not in (None, "auto") and "autoscaling_config" not in opts:
            options[name].pop("autoscaling_config", None)
        if "autoscaling_config" in opts:
            options[name].pop("num_replicas", None)
        options[name].update(opts)
    batching = INGRESS if cfg.fused else DECODER
    mor = options[batching].get("max_ongoing_requests")
    if isinstance(mor, int) and mor < cfg.max_batch_size:
        raise ConfigError(f"{batching}.max_ongoing_requests ({mor}) must be >= max_batch_size "
                          f"({cfg.max_batch_size}), or batches never fill")
    return options


def build_app(config: Mapping[str, Any] | ServeConfig,
              deployment_options: Mapping[str, Mapping[str, Any]] | None = None,
              token: str | None | object = ...) -> serve.Application:
    """The Serve application: ``GalaxyAPI`` (ingress) bound to a ``Decoder``.

    ``token`` defaults to the environment variable named by ``config.token_env`` (read here,
    in the process that builds the app, and handed to the replicas as an init argument);
    pass ``None`` to disable auth, or a string to set it.
    """
    cfg = serve_config(config)
    cfg = dataclasses.replace(cfg, model=absolute_models(cfg.model))
    if token is ...:
        token = os.environ.get(cfg.token_env) if cfg.token_env else None
    options = merge_deployment_options(cfg, deployment_options)
    decoder = None if cfg.fused else Decoder.options(**options[DECODER]).bind(cfg)
    return GalaxyAPI.options(**options[INGRESS]).bind(cfg, decoder, Token(token) if token else None)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``import_path: ray_galaxy.serve.app:app_builder`` in a Serve config.

    It runs where Serve builds the app (``serve run``'s process, or a task on the cluster for
    ``serve deploy``), whose environment is the cluster's: ``proxy: haproxy`` is checked there."""
    if serve_config(args).proxy == "haproxy" and os.environ.get(HAPROXY_ENV) != "1":
        raise ConfigError(f"proxy: haproxy needs {HAPROXY_ENV}=1 in the environment Ray starts with "
                          f"(`{HAPROXY_ENV}=1 serve run ...`, or in `ray start` on the cluster's nodes); "
                          "it is not set, or use proxy: default")
    return build_app(args)
