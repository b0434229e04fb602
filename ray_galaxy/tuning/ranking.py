"""Ranking a sweep's trials by how real their samples look (``--metric morphology``).

Tune's ASHA decides with validation bits/dim, which rewards reconstruction: a trial can win it
with a sharp decoder and a latent space whose samples look unlike galaxies. With the
``morphology`` metric the sweep, once its trials have ended, publishes instead the trial whose
samples are closest to the validation galaxies: every completed trial's best checkpoint is
exported as a model directory (``<run>/candidates/<trial_id>/``) with its fitted sampler, draws
``rank_samples`` galaxies from the same :class:`Generator` every job uses, and is scored by the
mean normalised Wasserstein distance over the morphology statistics (docs/morphology.md) against
the validation split of the sweep's data. Trials stopped early by ASHA are left unranked: their
models had fewer epochs, and ranking them would reward stopping.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ray_galaxy import morphology
from ray_galaxy.console import log
from ray_galaxy.evaluation import distances
from ray_galaxy.generation.generator import Generator
from ray_galaxy.imageset import load_images
from ray_galaxy.storage import join

RANK_COLUMNS = ("morphology_distance", "rank_val_bpd", "rank_morphology")
MAX_REAL_IMAGES = 1000  # validation galaxies measured: enough for a stable distance, a minute at most


def candidates_dir(run_dir: str, trial_id: str) -> str:
    """Where a ranked trial's model directory goes."""
    return join(run_dir, "candidates", trial_id)


def validation_morphology(data: str, size: int, crop: float, val_fraction: float, seed: int
                          ) -> dict[str, np.ndarray]:
    """Morphology statistics of the sweep's validation split (the training job's hash split)."""
    images, info = load_images(data, size, crop, limit=MAX_REAL_IMAGES, split="val",
                               val_fraction=val_fraction, seed=seed)
    log(f"ranking by morphology: {len(images)} validation galaxies measured (skipped {info['skipped']})")
    return morphology.measure_all(images)


def sample_distance(model_dir: str, real: dict[str, np.ndarray], n: int, seed: int) -> float:
    """Mean normalised morphology distance of a model's samples (its default sampler) to ``real``;
    infinite when no sample has a measurable central galaxy."""
    gen = Generator.load(model_dir)
    measured = morphology.measure_all(gen.images(n, seed))
    if not any(np.isfinite(v).any() for v in measured.values()):
        return math.inf  # not one sample has a measurable central galaxy: the worst there is
    table = distances.wasserstein_table(real, measured, seed)
    return distances.mean_distance(v["distance"] for v in table.values())


def rank_by_morphology(rows: list[dict[str, Any]], export: Callable[[dict[str, Any], str], None],
                       real: dict[str, np.ndarray], run_dir: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Score each completed trial (``export(row, model_dir)`` writes its model directory) and
    return the rows best first by morphology distance (unranked trials after them, by val_bpd),
    with the columns of :data:`RANK_COLUMNS` filled in."""
    for i, row in enumerate(rows, 1):  # rows arrive best first by val_bpd
        row["rank_val_bpd"] = i if row["best_val_bpd"] is not None else None
        row["morphology_distance"] = None
    ranked = [r for r in rows if r["status"] == "completed" and r["best_val_bpd"] is not None]
    for k, row in enumerate(ranked, 1):
        where = candidates_dir(run_dir, row["trial_id"])
        export(row, where)
        row["morphology_distance"] = sample_distance(where, real, n, seed)
        log(f"ranking by morphology: trial {row['trial_id']} ({k}/{len(ranked)}): mean distance "
            f"{row['morphology_distance']:.3f} over {n} samples (val_bpd {row['best_val_bpd']:.4f})")
    order = sorted(rows, key=lambda r: (r["morphology_distance"] is None, r["morphology_distance"] or 0.0,
                                        r["rank_val_bpd"] or len(rows) + 1))
    for i, row in enumerate(order, 1):
        row["rank_morphology"] = i if row["morphology_distance"] is not None else None
    return order
