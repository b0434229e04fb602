"""Do the classes come out right? The evaluation's check of conditional generation.

A simple classifier (logistic regression on the standardised morphology statistics of
:mod:`.morphology`, balanced class weights) is fitted to labelled training images. Then:

* its accuracy on the labelled held-out images, and its recall per class: the share that
  samples just like real galaxies of the class would get (far above it: samples more typical
  of their class than real galaxies are);
* per class, the share of conditional samples (``Generator.images(label=c)``) it assigns to c;
* per class, the morphology distance (mean normalised Wasserstein over the statistics) between
  the class's conditional samples and its real held-out images, next to the unconditional
  samples' distance to the same images: conditioning should bring it down.

Labels come from a CSV (:mod:`ray_galaxy.labels`: ``--labels``, else the one the sampler was
fitted with, else the model's ``train.labels``) or from prepared shards that store them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ray_galaxy import morphology
from ray_galaxy.console import log
from ray_galaxy.evaluation import distances
from ray_galaxy.evaluation.config import EvaluateConfig
from ray_galaxy.generation.generator import Generator
from ray_galaxy.imageset import ImageSet
from ray_galaxy.labels import LabelsError, LabelTable, label_counts, labels_for, read_labels
from ray_galaxy.morphology import STATS
from ray_galaxy.storage import exists

Stats = dict[str, np.ndarray]  # {statistic: (N,) values, NaN where the measurement failed}
CLASSIFIER = "logistic regression on the standardised morphology statistics, balanced class weights"


# --------------------------------------------------------------------------- labels


def labels_uri(cfg_labels: str, gen: Generator) -> str | None:
    """The labels CSV of an evaluation: ``--labels``, else the sampler's, else training's."""
    meta = gen.sampler.meta if gen.sampler is not None else {}
    return cfg_labels or meta.get("labels_source") or gen.model_dir.train_config.get("labels") or None


def read_table(uri: str | None, explicit: bool) -> LabelTable | None:
    """The labels CSV, read before any image. One given with ``--labels`` must be readable
    (:class:`LabelsError`); a recorded one may be gone (another machine): then None, said once."""
    if not uri:
        return None
    if not explicit:
        try:
            readable = exists(uri)
        except Exception:  # noqa: BLE001 - an unreachable URI means "not available"
            readable = False
        if not readable:
            log(f"classes: the recorded labels file {uri} is not readable here; pass --labels")
            return None
    return read_labels(uri)


def image_labels(found: ImageSet, table: LabelTable | None) -> list[str | None] | None:
    """Each image's class: from the CSV when there is one (None when none of the images is in
    it), else the one prepared shards stored (None when they stored none)."""
    if table is None:
        return found.labels
    try:
        return labels_for(found.paths, table)
    except LabelsError as e:
        log(f"classes: {e}")
        return None


# --------------------------------------------------------------------------- the classifier


@dataclass
class Classifier:
    """A fitted classifier of morphology statistics and what it was fitted on."""

    pipeline: Pipeline
    classes: list[str]
    train_images: int  # labelled, measured images it was fitted on
    dropped: int  # labelled images left out: a statistic failed (NaN)


def features(stats: Stats) -> np.ndarray:
    """(N, len(STATS)) feature matrix of morphology statistics."""
    return np.stack([np.asarray(stats[s], dtype=np.float64) for s in STATS], axis=1)


def fit_classifier(stats: Stats, labels: Sequence[str | None], seed: int = 0) -> Classifier:
    """Fit the classifier to the labelled images whose statistics were all measured. Raises
    ValueError with fewer than two classes among them."""
    x = features(stats)
    labelled = np.array([label is not None for label in labels])
    keep = labelled & np.isfinite(x).all(axis=1)
    y = np.array([label for label, k in zip(labels, keep) if k], dtype=object)
    classes = sorted(set(y.tolist()))
    if len(classes) < 2:
        raise ValueError(f"the classifier needs two classes among the measured training images, got {classes}")
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000,
                                                                   random_state=seed))
    pipeline.fit(x[keep], y.astype(str))
    return Classifier(pipeline, classes, int(keep.sum()), int(labelled.sum() - keep.sum()))


def predict(clf: Classifier, stats: Stats) -> np.ndarray:
    """The class of each image (object array), None where a statistic failed."""
    x = features(stats)
    ok = np.isfinite(x).all(axis=1)
    out = np.full(len(x), None, dtype=object)
    if ok.any():
        out[ok] = clf.pipeline.predict(x[ok])
    return out


def accuracy(pred: np.ndarray, truth: Sequence[str | None]) -> dict[str, Any]:
    """Accuracy and balanced accuracy over the images with a class and a prediction."""
    truth = np.asarray(truth, dtype=object)
    keep = np.array([t is not None for t in truth]) & np.array([p is not None for p in pred])
    if not keep.any():
        return {"images": 0, "accuracy": None, "balanced_accuracy": None}
    y, p = truth[keep].astype(str), pred[keep].astype(str)
    with warnings.catch_warnings():  # a class predicted but absent from y: a fact, not a problem
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(y, p))
    return {"images": int(keep.sum()), "accuracy": float(np.mean(y == p)), "balanced_accuracy": balanced}


def assigned_share(pred: np.ndarray, label: str) -> tuple[float | None, int]:
    """(share of the measured images predicted as ``label``, how many were measured)."""
    measured = [p for p in pred if p is not None]
    return (float(np.mean([p == label for p in measured])) if measured else None), len(measured)


# --------------------------------------------------------------------------- per class


def subset(stats: Stats, mask: np.ndarray) -> Stats:
    """The statistics of the images where ``mask`` is true."""
    return {k: v[mask] for k, v in stats.items()}


def mean_distance(real: Stats, other: Stats, seed: int) -> tuple[float | None, float | None]:
    """(mean normalised Wasserstein distance over STATS, its noise floor): None when too few images."""
    table = distances.wasserstein_table(real, other, seed)
    d = [v["distance"] for v in table.values() if math.isfinite(v["distance"])]
    f = [v["floor"] for v in table.values() if math.isfinite(v["floor"])]
    return (float(np.mean(d)) if d else None), (float(np.mean(f)) if f else None)


def per_class(clf: Classifier, label: str, real: Stats, real_pred: np.ndarray, conditional: Stats,
              unconditional: Stats, seed: int) -> dict[str, Any]:
    """One class's row: held-out recall, conditional samples' share, and morphology distances
    (``real``/``real_pred``: that class's held-out images)."""
    recall, held_out = assigned_share(real_pred, label)
    share, measured = assigned_share(predict(clf, conditional), label)
    d_cond, floor = mean_distance(real, conditional, seed)
    d_uncond, _ = mean_distance(real, unconditional, seed)
    return {"label": label, "held_out": int(len(real_pred)), "held_out_measured": held_out,
            "held_out_recall": recall, "conditional": int(len(next(iter(conditional.values())))),
            "conditional_measured": measured, "conditional_share": share,
            "distance_conditional": d_cond, "distance_unconditional": d_uncond, "distance_floor": floor}


# --------------------------------------------------------------------------- the whole check


def skip_reason(cfg: EvaluateConfig, gen: Generator, real_labels: list | None, train: np.ndarray | None,
                train_labels: list | None) -> str | None:
    """Why the classes check cannot run, or None when it can."""
    if not gen.labels:
        return "the model's sampler was fitted without labels (fit it with --labels CSV to sample by class)"
    if cfg.sampler != "gmm":
        return f"sampler {cfg.sampler!r} has no classes (the classes check needs the fitted sampler)"
    if train is None or train_labels is None:
        return "the labelled training images are not available here (pass --train-data and --labels)"
    if real_labels is None:
        return "the held-out images have no labels (pass --labels with a CSV that covers them)"
    return None


def score_classes(cfg: EvaluateConfig, gen: Generator, m_real: Stats, real_labels: list | None,
                  train: np.ndarray | None, train_labels: list | None, m_uncond: Stats,
                  source: str | None) -> dict[str, Any]:
    """The classes check (module docstring) as metrics.json's "classes" section; {"skipped": why}
    when it cannot run."""
    reason = skip_reason(cfg, gen, real_labels, train, train_labels)
    if reason is not None:
        log(f"classes: skipped: {reason}")
        return {"skipped": reason}
    rng = np.random.default_rng(cfg.seed)
    rows = np.flatnonzero([label is not None for label in train_labels])
    if len(rows) > cfg.class_train:
        rows = np.sort(rng.choice(rows, cfg.class_train, replace=False))
    used = [train_labels[i] for i in rows]
    try:
        clf = fit_classifier(morphology.measure_all(train[rows]), used, cfg.seed)
    except ValueError as e:  # one class among the training images: nothing to tell apart
        log(f"classes: skipped: {e}")
        return {"skipped": str(e)}
    real_pred = predict(clf, m_real)
    held = accuracy(real_pred, real_labels)
    n_per_class = cfg.n_per_class or max(cfg.n // len(gen.labels), 2)
    table, counts = [], label_counts(used)
    for c in gen.labels:
        mask = np.array([label == c for label in real_labels])
        drawn = gen.images(n_per_class, cfg.seed, cfg.sampler, cfg.temperature, detail=cfg.detail, label=c)
        table.append({"label": c, "train": counts.get(c, 0)}
                     | per_class(clf, c, subset(m_real, mask), real_pred[mask], morphology.measure_all(drawn),
                                 m_uncond, cfg.seed))
    shares = [r["conditional_share"] for r in table if r["conditional_share"] is not None]
    out = {"skipped": None, "labels_source": source, "labels": gen.labels, "classifier": CLASSIFIER,
           "train_images": clf.train_images, "train_dropped": clf.dropped, "held_out": held,
           "n_per_class": n_per_class, "mean_conditional_share": float(np.mean(shares)) if shares else None,
           "per_class": table}
    _log(out)
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _log(out: dict[str, Any]) -> None:
    held = out["held_out"]
    log(f"classes: classifier fitted on {out['train_images']} training images ({out['train_dropped']} dropped: "
        f"failed morphology); accuracy {_fmt(held['accuracy'])} (balanced {_fmt(held['balanced_accuracy'])}) "
        f"on {held['images']} held-out images")
    log("classes: conditional samples assigned to their class (real held-out in brackets): " + ", ".join(
        f"{r['label']} {_fmt(r['conditional_share'])} ({_fmt(r['held_out_recall'])})" for r in out["per_class"]))
