"""Serve a trained model directory over HTTP (Ray Serve), blocking until Ctrl-C.

    python jobs/serve.py --model runs/galaxy-vae/model            # http://127.0.0.1:8000/docs
    RAY_GALAXY_TOKEN=secret python jobs/serve.py --model s3://bucket/runs/galaxy-vae/model --port 8080
    python jobs/serve.py --model runs/gz2/model --model runs/xdf/model   # two models, ?model=gz2 or xdf

Application args and deployment options (batching, autoscaling, CPUs/GPUs) come from
``--config`` (default cluster/serve.yaml, the file ``serve run``/``serve deploy`` use); --model,
--host and --port override it. Joins the cluster at RAY_ADDRESS when set, else starts a local Ray.
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None, metavar="[NAME=]PATH",
                   help="model directory written by jobs/train.py (path or URI); repeat it to serve several "
                        "from one endpoint (a request picks one with model=NAME, default the first). A "
                        "model's NAME is its directory's last part (the run folder of <run>/model); give "
                        "NAME=PATH where two would share one. Default: the config's args.model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--config", default=os.path.join(REPO, "cluster", "serve.yaml"),
                   help="Serve config file for app args and deployment options (default cluster/serve.yaml)")
    p.add_argument("--name", default=None, help="application name (default: the config's)")
    p.add_argument("--proxy", choices=("default", "haproxy"), default=None,
                   help="HTTP proxy in front of the app: Serve's own or HAProxy (default: the config's args.proxy)")
    args = p.parse_args(argv)

    # After parsing: --help answers without importing Ray.
    from ray_galaxy.checkpoint import ModelDirError
    from ray_galaxy.config import ConfigError
    from ray_galaxy.serve.runner import serve_model

    try:
        serve_model(args.model, args.config, args.host, args.port, args.name, proxy=args.proxy)
    except (ConfigError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
