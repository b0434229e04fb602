"""Fit the two-stage GMM latent sampler of a model directory (writes sampler.pt, sampler.json).

    python jobs/fit_sampler.py --model runs/galaxy-vae/model [--train-data URI] [--components 40]
    python jobs/fit_sampler.py --model runs/galaxy-vae/model --labels path/to/gz2/labels.csv  # per label

Then: python jobs/evaluate.py --model runs/galaxy-vae/model --sampler gmm ...
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_galaxy.checkpoint import ModelDirError  # noqa: E402
from ray_galaxy.config import DETAIL_MODES  # noqa: E402
from ray_galaxy.console import log  # noqa: E402
from ray_galaxy.data import DataError  # noqa: E402
from ray_galaxy.generation.fit import fit_sampler  # noqa: E402
from ray_galaxy.generation.sampler import (COVARIANCES, GMM_COMPONENTS, KERNEL_BANDWIDTH,  # noqa: E402
                                           SAMPLER_ORIENTATIONS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The job's flags, checked (argparse exits with a message on a bad one)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by jobs/train.py")
    p.add_argument("--train-data", default=None,
                   help="training images (default: train.data from the model's config.json, its training split)")
    p.add_argument("--labels", default=None,
                   help="CSV of class labels of the training images (first column: file name or stem; class: "
                        "the column named label, class or morphology, else the last): fits the sampler per "
                        "label so jobs can draw one class (default: the CSV training recorded, else labels "
                        "stored in prepared shards)")
    p.add_argument("--components", type=int, default=GMM_COMPONENTS,
                   help=f"mixture components (default {GMM_COMPONENTS})")
    p.add_argument("--orientations", type=int, default=SAMPLER_ORIENTATIONS,
                   help="fit to the codes of each training image in this many of its 8 D4 orientations "
                        f"(rotations and mirror images, as training augments); default {SAMPLER_ORIENTATIONS}")
    p.add_argument("--bandwidth", type=float, default=KERNEL_BANDWIDTH,
                   help="draw from Gaussian kernels on the training codes, each shaped like its mixture "
                        f"component and scaled by this (default {KERNEL_BANDWIDTH}); 0 draws from the "
                        "mixture's components")
    p.add_argument("--covariance", choices=COVARIANCES, default="full", help="covariance (default full)")
    p.add_argument("--crop", type=float, default=None, help="crop fraction (default: the model's own)")
    p.add_argument("--max-images", type=int, default=5000, help="at most this many training images (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--detail", choices=DETAIL_MODES, default="galaxy",
                   help="residual detail model: galaxy (texture following the galaxy's light; the default), sky "
                        "(the sky's noise only) or none")
    p.add_argument("--no-detail", dest="detail", action="store_const", const="none",
                   help="fit only the latent mixture, not the residual detail model (--detail none)")
    args = p.parse_args(argv)
    if args.components < 1 or args.max_images < 1:
        p.error("--components and --max-images must be >= 1")
    if not 1 <= args.orientations <= 8:
        p.error("--orientations must be in 1..8")
    if not (args.bandwidth >= 0 and math.isfinite(args.bandwidth)):
        p.error(f"--bandwidth must be a finite number >= 0, got {args.bandwidth}")
    return args


def describe(meta: dict, model: str) -> str:
    """One line saying what was fitted and what the sampler draws from."""
    detail = meta["detail"]
    return (f"fitted a {meta['components']}-component {meta['covariance']} GMM to {meta['codes']} codes of "
            f"{meta['train_images']} training images in {meta['orientations']} orientations "
            f"({meta['iterations']} EM iterations, mean log-likelihood {meta['mean_log_likelihood']:.3f}); draws from "
            + (f"kernels on the {meta['codes']} codes (bandwidth {meta['bandwidth']:g})" if meta["kernels"] == "codes"
               else "its components")
            + (f" and the residual detail model ({detail.get('kind', 'galaxy')}, gain {detail['gain']:.2f}: structure-band power "
               f"{detail['power_deficit_dex_at_gain_1']:+.3f} -> {detail['power_deficit_dex']:+.3f} "
               "dex against the training images)" if detail else "")
            + (f"; per label: {', '.join(f'{k} ({v} images)' for k, v in meta['label_counts'].items())}"
               if meta.get("labels") else "")
            + f"; wrote sampler.pt and sampler.json in {model}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log(f"fitting a {args.components}-component GMM to the codes of the training images in "
        f"{args.orientations} orientations (about a minute for 1,000 images on 2 cores)...")
    try:
        meta = fit_sampler(args.model, args.train_data, args.components, args.covariance, args.seed,
                           args.crop, args.max_images, detail=args.detail,
                           orientations=args.orientations, bandwidth=args.bandwidth, labels=args.labels)
    except (ModelDirError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(describe(meta, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
