"""Prepare raw galaxy pictures into Parquet shards for training (local folders or s3://).

    python jobs/prepare_data.py --input path/to/gz2/train --output data/gz2-256 --crop 0.5 --dedupe
    python jobs/prepare_data.py ... --labels path/to/gz2/labels.csv   # store each image's class too
    python jobs/train.py --data data/gz2-256 --image-size 64
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_galaxy.config import parse_config  # noqa: E402
from ray_galaxy.data import DataError  # noqa: E402
from ray_galaxy.prepare import PrepareConfig, prepare  # noqa: E402
from ray_galaxy.runtime import ClusterError, ensure_ray  # noqa: E402
from ray_galaxy.storage import StorageError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, connect to Ray and prepare; 2 with one error line when the data cannot be used."""
    cfg, _ = parse_config(PrepareConfig, argv, __doc__)
    try:
        ensure_ray()
        manifest = prepare(cfg)
    except (ClusterError, DataError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared data: {cfg.output} ({manifest['written']} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
