"""Evaluate a trained model directory on held-out galaxies: likelihood, reconstructions,
morphology and sharpness of generated galaxies, memorisation and, for a model whose sampler
has labels, whether conditional samples come out as their class; writes report.md,
metrics.json and figures.

    python jobs/evaluate.py --model runs/galaxy-vae/model --data /data/gz2/val --crop 0.5 --out eval/
    python jobs/evaluate.py --model M --data D --out eval-gmm/ --sampler gmm --fit-sampler
    python jobs/evaluate.py --model M --data path/to/gz2/val --labels path/to/gz2/labels.csv --out eval/

Definitions and caveats: docs/model.md, section "Evaluation".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_galaxy.config import parse_config  # noqa: E402
from ray_galaxy.evaluation.config import EvaluateConfig  # noqa: E402
from ray_galaxy.evaluation.evaluate import main_entry  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(EvaluateConfig, argv, __doc__)
    return main_entry(cfg)


if __name__ == "__main__":
    sys.exit(main())
