"""Write new galaxies from a trained model directory (local path or s3:// URI).

    python jobs/sample.py --model runs/galaxy-vae/model --n 64 --out samples/ --grid
    python jobs/sample.py --model runs/galaxy-vae/model --n 64 --out spirals/ --grid --label spiral
    python jobs/sample.py --model runs/galaxy-vae/model --n 64 --out big/ --where "r50_px >= 6 and ellipticity > 0.5"
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_galaxy.checkpoint import ModelDirError  # noqa: E402
from ray_galaxy.figures import write_samples  # noqa: E402
from ray_galaxy.generation.generator import SAMPLERS, Generator, LabelError  # noqa: E402
from ray_galaxy.generation.where import WhereError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, load the model directory once and write the PNGs; 2 on a bad model, label or
    selection."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by jobs/train.py")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--out", required=True, help="output folder for PNGs")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    p.add_argument("--temperature", type=float, default=1.0, help="scale of the prior (default 1.0)")
    p.add_argument("--grid", action="store_true", help="also write grid.png with all images")
    p.add_argument("--sampler", choices=SAMPLERS, default="auto",
                   help="latent sampler: N(0, I) prior or the model's fitted Gaussian mixture "
                        "(jobs/fit_sampler.py; gmm also adds its residual detail); auto (default): "
                        "gmm when the model directory has a sampler, else prior")
    p.add_argument("--label", default=None,
                   help="only galaxies of this class (a model whose sampler was fitted with --labels; an "
                        "unknown class lists the valid ones); default: any class")
    p.add_argument("--where", default=None,
                   help="only from training galaxies whose properties satisfy this, e.g. \"r50_px >= 6 and "
                        "ellipticity > 0.5\" (comparisons with numbers joined by and/or; properties and units: "
                        "docs/properties.md); default: any")
    p.add_argument("--no-detail", action="store_true",
                   help="with --sampler gmm: write the decoder's means, without the residual detail")
    args = p.parse_args(argv)

    if not 1 <= args.n <= 100_000:
        p.error(f"--n must be in 1..100000, got {args.n}")
    try:
        gen = Generator.load(args.model)
        paths = write_samples(gen, args.out, args.n, args.seed, args.temperature, args.grid,
                              sampler=args.sampler, detail=not args.no_detail, label=args.label, where=args.where)
    except (ModelDirError, LabelError, WhereError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
