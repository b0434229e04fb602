"""Hyperparameter sweep of the galaxy VAE with Ray Tune (ASHA): one Ray Train run per trial.

    python jobs/tune.py                                    # cluster/tune.yaml's defaults, local Ray
    python jobs/tune.py --config cluster/tune.yaml --num-samples 16 --epochs 40
    ray job submit --working-dir . -- python jobs/tune.py --config cluster/tune-gpu.yaml

Writes <storage>/<name>/trials.csv, trials.md, trials.png and the best trial's model
directory <storage>/<name>/model/ (the format jobs/sample.py reads). Run again with the same
--name and --storage, it resumes an interrupted sweep, or publishes a finished one's results
again; a new sweep needs a new --name.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_galaxy.config import parse_config  # noqa: E402
from ray_galaxy.tuning.config import TuneConfig  # noqa: E402
from ray_galaxy.tuning.sweep import main_entry  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(TuneConfig, argv, __doc__)
    return main_entry(cfg)


if __name__ == "__main__":
    sys.exit(main())
