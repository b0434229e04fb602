"""Train the galaxy VAE with Ray Train.

    python jobs/train.py                                   # built-in hubble-xdf set, local Ray
    python jobs/train.py --config cluster/train.yaml --epochs 10
    ray job submit --working-dir . -- python jobs/train.py --config cluster/train-gpu.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_galaxy.config import PRESETS, TrainConfig, parse_config  # noqa: E402
from ray_galaxy.training.trainer import main_entry  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(TrainConfig, argv, __doc__, presets=PRESETS)
    return main_entry(cfg)


if __name__ == "__main__":
    sys.exit(main())
