"""The evaluation's classes check (ray_galaxy/evaluation/classes.py): a morphology classifier,
its held-out accuracy, the share of conditional samples it puts in the class asked for, and the
per-class morphology distances; end to end with a tiny model whose sampler has labels."""

import shutil

import numpy as np
import pytest
from PIL import Image
from synthetic import galaxy
from tiny_model import SIZE, make_tiny

from ray_galaxy.evaluation import classes as C
from ray_galaxy.evaluation import evaluate as E
from ray_galaxy.evaluation.config import EvaluateConfig
from ray_galaxy.morphology import measure_all
from ray_galaxy.generation.fit import fit_sampler
from ray_galaxy.generation.generator import Generator
from ray_galaxy.labels import LabelsError
from ray_galaxy.imageset import load_images


def _galaxies(n: int, sigma: float, seed: int) -> np.ndarray:
    """``n`` round-ish synthetic galaxies of one size (``sigma`` px): a class by construction."""
    rng = np.random.default_rng(seed)
    return np.stack([galaxy(SIZE, rng, ellipticity=rng.uniform(0, 0.3), sigma=sigma) for _ in range(n)])


@pytest.fixture(scope="module")
def sized():
    """Small (sigma 1.5 px) and large (sigma 6 px) galaxies: separable by size and concentration.
    Training has one blank frame too (labelled, but nothing to measure)."""
    blank = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    train = np.concatenate([_galaxies(20, 1.5, 1), _galaxies(20, 6.0, 2), blank])
    held = np.concatenate([_galaxies(10, 1.5, 3), _galaxies(8, 6.0, 4)])
    return {"train": measure_all(train), "train_labels": ["small"] * 20 + ["large"] * 20 + ["small"],
            "held": measure_all(held), "held_labels": ["small"] * 10 + ["large"] * 8}


def test_the_classifier_separates_classes_apart_in_morphology_and_scores_itself(sized):
    clf = C.fit_classifier(sized["train"], sized["train_labels"], seed=0)
    assert clf.classes == ["large", "small"] and clf.train_images == 40 and clf.dropped == 1  # the blank frame
    pred = C.predict(clf, sized["held"])
    truth = np.array(sized["held_labels"], dtype=object)
    got = C.accuracy(pred, sized["held_labels"])
    assert got["images"] == 18
    assert got["accuracy"] == pytest.approx(np.mean(pred == truth)) == pytest.approx(1.0)
    recalls = [np.mean(pred[truth == c] == c) for c in ("large", "small")]
    assert got["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    # Unlabelled images and failed measurements count in neither; none at all gives None.
    blank = measure_all(np.zeros((2, SIZE, SIZE, 3), np.uint8))
    both = {k: np.r_[sized["held"][k], blank[k]] for k in blank}
    mixed = C.accuracy(C.predict(clf, both), sized["held_labels"][:-1] + [None, "small", "large"])
    assert mixed["images"] == 17 and mixed["accuracy"] == pytest.approx(1.0)
    assert C.accuracy(C.predict(clf, blank), ["small", "large"]) == {"images": 0, "accuracy": None,
                                                                       "balanced_accuracy": None}
    with pytest.raises(ValueError, match="needs two classes"):
        C.fit_classifier(sized["train"], ["small"] * 41)


def test_a_class_row_holds_the_share_assigned_to_it_and_the_distances(sized):
    clf = C.fit_classifier(sized["train"], sized["train_labels"])
    # "Conditional samples" of class small: 6 small, 4 large, 1 blank (not measured).
    drawn = np.concatenate([_galaxies(6, 1.5, 5), _galaxies(4, 6.0, 6), np.zeros((1, SIZE, SIZE, 3), np.uint8)])
    m_drawn = measure_all(drawn)
    pred = C.predict(clf, m_drawn)
    assert pred[-1] is None
    small = np.array(sized["held_labels"]) == "small"
    real = C.subset(sized["held"], small)
    row = C.per_class(clf, "small", real, C.predict(clf, real), m_drawn, sized["held"], seed=0)
    by_hand = np.mean([p == "small" for p in pred[:-1]])
    assert row["conditional_share"] == pytest.approx(by_hand) == pytest.approx(0.6)
    assert row["conditional"] == 11 and row["conditional_measured"] == 10
    assert row["held_out"] == 10 and row["held_out_recall"] == pytest.approx(1.0)
    # Samples of the class alone sit nearer its real galaxies than a mix of both classes does.
    pure = C.per_class(clf, "small", real, C.predict(clf, real), measure_all(_galaxies(10, 1.5, 7)),
                       sized["held"], seed=0)
    assert pure["conditional_share"] == 1.0
    assert pure["distance_conditional"] < pure["distance_unconditional"]
    assert pure["distance_unconditional"] == row["distance_unconditional"]
    assert pure["distance_floor"] == row["distance_floor"] > 0


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A tiny model whose sampler is fitted per label (small/large by half-light radius, from a
    CSV), and held-out galaxies of both sizes under names of their own in the same CSV."""
    root = tmp_path_factory.mktemp("classes")
    tiny = make_tiny(root)
    held = root / "held"
    held.mkdir()
    imgs = np.concatenate([_galaxies(8, 2.0, 11), _galaxies(8, 5.0, 12)])
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(held / f"h{i:03d}.png")
    train, _ = load_images(str(tiny["train"]), SIZE, 1.0)
    r_half = measure_all(train)["r_half"]
    cut = np.nanmedian(r_half)
    rows = [f"g{i:03d}.png,{'small' if r < cut else 'large'}" for i, r in enumerate(r_half)]
    rows += [f"h{i:03d},{'small' if i < 8 else 'large'}" for i in range(16)]
    csv = root / "labels.csv"
    csv.write_text("id,morphology\n" + "\n".join(rows) + "\n")
    model = str(root / "labelled")
    shutil.copytree(tiny["model"], model)
    fit_sampler(model, labels=str(csv), components=2, detail=False)
    return {**tiny, "labelled": model, "held": held, "csv": csv}


def test_evaluate_reports_the_classes_of_a_labelled_model(labelled, tmp_path):
    assert Generator.load(labelled["labelled"]).labels == ["large", "small"]
    cfg = EvaluateConfig(model=labelled["labelled"], data=str(labelled["held"]), out=str(tmp_path / "eval"),
                         n=8, max_images=16, iwae_k=2, tracking=False, detail=False, n_per_class=6,
                         realism=False, properties=False)  # checked in test_realism.py and test_match.py
    everything = E.evaluate(cfg)
    m = everything["classes"]
    assert m["skipped"] is None and m["labels_source"] == str(labelled["csv"])  # the sampler's CSV
    assert m["labels"] == ["large", "small"] and m["n_per_class"] == 6
    assert m["train_images"] + m["train_dropped"] == everything["train"]["images"]  # every one is labelled
    assert sum(r["train"] for r in m["per_class"]) == everything["train"]["images"]
    assert m["held_out"]["images"] == 16 and m["held_out"]["accuracy"] >= 0.75  # size is learnable
    for row in m["per_class"]:
        assert row["held_out"] == 8 and row["conditional"] == 6
        assert 0 <= row["conditional_share"] <= 1 and row["distance_conditional"] >= 0
    assert m["mean_conditional_share"] == pytest.approx(np.mean([r["conditional_share"] for r in m["per_class"]]))
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Classes" in report and f"classes from `{labelled['csv']}`" in report
    for r in m["per_class"]:
        assert f"| {r['label']} | {r['train']} | 8 | " in report
    # --labels overrides the recorded CSV and must be readable: refused before any image is read.
    bad = EvaluateConfig(model=labelled["labelled"], data=str(labelled["held"]), out=str(tmp_path / "bad"),
                         tracking=False, labels=str(tmp_path / "nope.csv"))
    with pytest.raises(LabelsError, match="cannot read labels file .*nope.csv"):
        E.evaluate(bad)
    assert E.main_entry(bad) == 2


def test_the_classes_check_says_why_it_is_skipped(labelled, tmp_path):
    unlabelled = str(tmp_path / "plain")
    shutil.copytree(labelled["model"], unlabelled)
    fit_sampler(unlabelled, components=2, detail=False)
    cfg = EvaluateConfig(model=unlabelled, data=str(labelled["held"]), out=str(tmp_path / "eval"), n=8,
                         max_images=8, iwae_k=2, tracking=False, detail=False, realism=False, properties=False)
    m = E.evaluate(cfg)
    assert m["classes"] == {"skipped": "the model's sampler was fitted without labels (fit it with --labels "
                                       "CSV to sample by class)"}
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Classes\n\nSkipped: the model's sampler was fitted without labels" in report
    # A labelled model evaluated with the prior: no classes to draw from.
    prior = E.evaluate(EvaluateConfig(model=labelled["labelled"], data=str(labelled["held"]), n=8, max_images=8,
                                      out=str(tmp_path / "prior"), iwae_k=2, tracking=False, sampler="prior",
                                      realism=False, properties=False))
    assert "sampler 'prior' has no classes" in prior["classes"]["skipped"]
