"""What ``python jobs/serve.py`` does: check the model and the Serve config, start the app on
this machine's (or RAY_ADDRESS's) Ray, print one line with its URL, and serve until stopped.

Ray's and Serve's own logs go to Ray's log folder (``/tmp/ray/session_latest/logs``), not here.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import ray
from ray import serve

from ray_galaxy.checkpoint import load_model_dir
from ray_galaxy.console import log
from ray_galaxy.serve.app import absolute_models, build_app
from ray_galaxy.serve.config import APP_NAME, serve_config
from ray_galaxy.serve.proxy import check_cluster, enable_for_local_ray
from ray_galaxy.serve.yaml_check import load_serve_config

QUIET = {"log_level": "WARNING", "enable_access_log": False}


def prepare(models: list[str] | None, config_path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(app args, deployment overrides, the config's application) for ``models`` (one or more
    ``[NAME=]PATH``; None: the config's ``model``); raises ConfigError for a bad config file or
    two models of one name, and ModelDirError for a model directory that is not finished, here
    rather than later in a replica's log."""
    _, app_cfg = load_serve_config(config_path)
    args = dict(app_cfg.get("args") or {})
    if models:
        args["model"] = models[0] if len(models) == 1 else list(models)
    cfg = serve_config(args)
    args["model"] = absolute_models(cfg.model)
    for _, location in serve_config(args).models:
        load_model_dir(location, weights=False)
    overrides = {d["name"]: d for d in app_cfg.get("deployments") or []}
    return args, overrides, app_cfg


def _explorer_url(url: str, app_args: dict[str, Any]) -> str:
    """The explorer's address, naming the token's variable (never the token itself)."""
    token_env = app_args.get("token_env", "RAY_GALAXY_TOKEN")
    return f"{url}/?token=<${token_env}>" if token_env and os.environ.get(token_env) else f"{url}/"


def _wait_for_stop() -> None:
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


def serve_model(models: list[str] | None, config_path: str, host: str = "127.0.0.1", port: int = 8000,
                name: str | None = None, proxy: str | None = None) -> None:
    """Serve ``models`` (None: the config's) at http://host:port/ behind ``proxy`` (None: the
    config's) until Ctrl-C or SIGTERM, then shut Serve down."""
    app_args, overrides, app_cfg = prepare(models, config_path)
    if proxy:
        app_args = {**app_args, "proxy": proxy}
    application = build_app(app_args, overrides)
    route_prefix = app_cfg.get("route_prefix", "/") or "/"
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines are in Ray's log folder
    proxy = serve_config(app_args).proxy
    if proxy == "haproxy" and not os.environ.get("RAY_ADDRESS"):
        enable_for_local_ray()  # this job's own Ray: before it starts
    ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="warning", log_to_driver=False)
    check_cluster(proxy)
    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
    serve.run(application, name=name or app_cfg.get("name", APP_NAME), route_prefix=route_prefix,
              logging_config=QUIET)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    served = serve_config(app_args).models
    what = served[0][1] if len(served) == 1 else ", ".join(f"{n} ({loc})" for n, loc in served)
    front = "HAProxy" if proxy == "haproxy" else "Serve"
    log(f"serving {what} behind {front}'s HTTP proxy: latent explorer: open {_explorer_url(url, app_args)} in a browser "
        f"(API docs {url}/docs; Ctrl-C to stop)")
    _wait_for_stop()
    log("shutting down")
    serve.shutdown()
