"""Serve a trained model directory over HTTP (Ray Serve), blocking until Ctrl-C.

    python jobs/serve.py --model runs/galaxy-vae/model            # http://127.0.0.1:8000/docs
    RAY_GALAXY_TOKEN=secret python jobs/serve.py --model s3://bucket/runs/galaxy-vae/model --port 8080

Application args and deployment options (batching, autoscaling, CPUs/GPUs) come from
``--config`` (default cluster/serve.yaml, the file ``serve run``/``serve deploy`` use); --model,
--host and --port override it. Joins the cluster at RAY_ADDRESS when set, else starts a local Ray.
"""

import argparse
import os
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by jobs/train.py (path or URI)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--config", default=os.path.join(REPO, "cluster", "serve.yaml"),
                   help="Serve config file for app args and deployment options (default cluster/serve.yaml)")
    p.add_argument("--name", default=None, help="application name (default: the config's)")
    args = p.parse_args(argv)

    from ray_galaxy.checkpoint import ModelDirError, load_model_dir
    from ray_galaxy.config import ConfigError
    from ray_galaxy.serve import build_app, load_serve_config

    try:
        _, app_cfg = load_serve_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = args.model if "://" in args.model else os.path.abspath(os.path.expanduser(args.model))
    try:  # fail here, with the reason, rather than in a replica's log
        load_model_dir(model)
    except ModelDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app_args = {**(app_cfg.get("args") or {}), "model": model}
    overrides = {d["name"]: d for d in app_cfg.get("deployments") or []}
    name = args.name or app_cfg.get("name", "galaxy")
    route_prefix = app_cfg.get("route_prefix", "/") or "/"

    import ray
    from ray import serve

    try:
        application = build_app(app_args, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="warning")
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name=name, route_prefix=route_prefix)
    url = f"http://{args.host}:{args.port}{route_prefix.rstrip('/')}"
    print(f"[ray-galaxy] serving {model} at {url}/  (API docs: {url}/docs; Ctrl-C to stop)", flush=True)
    token_env = app_args.get("token_env", "RAY_GALAXY_TOKEN")
    page = f"{url}/?token=<${token_env}>" if token_env and os.environ.get(token_env) else f"{url}/"
    print(f"[ray-galaxy] latent explorer: open {page} in a browser", flush=True)

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print("[ray-galaxy] shutting down", flush=True)
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
