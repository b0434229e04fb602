"""Generate a catalogue of galaxies with Ray Data: Parquet shards (or PNGs), local or s3://.

    python jobs/generate.py --model runs/galaxy-vae/model --n 100000 --out catalogue/ --num-workers 4
    python jobs/generate.py --model s3://bucket/model --n 1000000 --out s3://bucket/cat --use-gpu
    python jobs/generate.py --model runs/galaxy-vae/model --n 1000 --out spirals/ --label spiral
    python jobs/generate.py --model runs/galaxy-vae/model --n 1000 --out round/ --where "ellipticity < 0.2"
    python jobs/generate.py --model runs/galaxy-vae/model --match targets.csv --out matched/  # one per row

Rerunning the same command resumes: only missing shards are generated (docs/generate.md).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_galaxy.catalogue import CatalogueConfig, CatalogueError, generate_catalogue  # noqa: E402
from ray_galaxy.checkpoint import ModelDirError  # noqa: E402
from ray_galaxy.config import parse_config  # noqa: E402
from ray_galaxy.generation.generator import LabelError  # noqa: E402
from ray_galaxy.generation.match import MatchError  # noqa: E402
from ray_galaxy.generation.where import WhereError  # noqa: E402
from ray_galaxy.storage import StorageError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and write the catalogue; 2 with one error line when it cannot be made."""
    cfg, _ = parse_config(CatalogueConfig, argv, __doc__)
    try:
        manifest = generate_catalogue(cfg)
    except (ModelDirError, CatalogueError, LabelError, WhereError, MatchError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"catalogue: {cfg.out} ({manifest['n']} galaxies, {len(manifest['shards'])} shard(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
