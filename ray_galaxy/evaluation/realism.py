"""Realism: can a classifier tell generated galaxies from real ones?

A classifier two-sample test (Lopez-Paz & Oquab 2017, "Revisiting Classifier Two-Sample
Tests"): a small CNN (:class:`ray_galaxy.critic.Critic`, the network the adversarial
fine-tuning trains against), trained from scratch on this machine (nothing downloaded), learns to tell
the evaluation's real images from generated ones; its accuracy on images it was not trained on
measures how far apart the two sets are. 0.5 is "cannot tell them apart", 1.0 "always can".
The same test between two disjoint halves of the real set is the floor: what a classifier
trained on this little data scores on no difference at all.

Why write the test here rather than take a library's: the published ones (e.g. torchmetrics'
FID/KID, or a C2ST on a pretrained network's features) need ImageNet weights, which nothing here
may download, and they judge natural-image features, not sky noise and galaxy cores at 64 px.

Protocol, for two sets A (real, label 0) and B (generated, label 1) of n images each:
  * both are shuffled with the seed and cut into ``folds`` folds; for each fold the CNN is
    trained from a seeded initialisation on the other folds of A and B and tested on this fold;
  * training sees each image in a random D4 orientation (flips and quarter turns) each step,
    so it cannot learn a set's orientation, only its content;
  * accuracy is the share of test images classified right (threshold 0.5), measured after each
    of a few training budgets (:data:`STEPS`) of the same run: the mean over folds, with the
    folds' standard deviation as the spread;
  * every test image's held-out probability of being generated (from the longest-trained CNN)
    is kept, so the report can show the generated images the classifier is surest are fake and
    the real ones surest are real.

Why several budgets: a C2ST's accuracy is a lower bound on how far apart the sets are, and it
rises with the classifier's training until the classifier has learnt what there is to learn.
The last budget (600 steps) is the headline; the shorter one shows how easy the difference is
to find. Before each measurement the BatchNorm statistics are re-estimated with the current
weights (:func:`recalibrate_batchnorm`): with the trailing running averages, the 150-step
figure of every GZ2 model was about 0.7 with folds at 0.5 and 0.9, which said more about the
statistics than about the galaxies (re-estimated: 0.97-0.98; docs/experiments.md, "How strict
the realism test is").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ray_galaxy.console import log
from ray_galaxy.critic import Critic
from ray_galaxy.evaluation.metrics import to_tensor
from ray_galaxy.images import augment_d4

FOLDS = 2
# Training budgets (optimiser steps) after which each fold's held-out accuracy is measured; the
# last is the headline. GZ2, 600 + 600 images at 64 px: ~40 s a test on 2 cores.
STEPS = (150, 600)
BATCH = 32  # per side: every step sees 32 real and 32 generated images
LR = 1e-3
WIDTH = 16  # the CNN: ray_galaxy.critic.Critic, the adversarial fine-tuning's critic too
SHOW = 16  # images per panel of the "surest" figure


@dataclass
class TwoSampleResult:
    """One classifier two-sample test: held-out accuracy after each training budget (mean over
    folds, and per fold) and the held-out probability of "generated" of every image of each set."""

    steps: tuple[int, ...]
    fold_accuracies: dict[int, list[float]]  # budget -> one accuracy per fold
    n_per_set: int
    p_fake_a: np.ndarray = field(repr=False)  # (n,) for set A, each from the fold it was held out in
    p_fake_b: np.ndarray = field(repr=False)

    def at(self, steps: int | None = None) -> float:
        """Mean accuracy over folds after ``steps`` (default: the headline, the last budget)."""
        return float(np.mean(self.fold_accuracies[steps or self.steps[-1]]))

    @property
    def accuracy(self) -> float:
        """The headline accuracy (last budget)."""
        return self.at()

    def spread(self, steps: int | None = None) -> float:
        """Standard deviation of the accuracy over folds."""
        return float(np.std(self.fold_accuracies[steps or self.steps[-1]]))

    def summary(self) -> dict[str, Any]:
        """The numbers for metrics.json, the report and MLflow: the headline, its spread, and the
        accuracy after every budget."""
        return {"accuracy": self.accuracy, "spread": self.spread(), "steps": self.steps[-1],
                "fold_accuracies": self.fold_accuracies[self.steps[-1]], "n_per_set": self.n_per_set,
                "by_steps": {str(k): {"accuracy": self.at(k), "spread": self.spread(k)} for k in self.steps}}


def _accuracy(p_a: np.ndarray, p_b: np.ndarray) -> float:
    return float(((p_a < 0.5).sum() + (p_b >= 0.5).sum()) / (len(p_a) + len(p_b)))


def _train(a: torch.Tensor, b: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor], steps: tuple[int, ...],
           seed: int) -> tuple[dict[int, float], np.ndarray, np.ndarray]:
    """A fresh CNN (seeded) trained to give a low logit to rows of ``a`` and a high one to ``b``;
    its accuracy on the ``test`` pair after each budget in ``steps``, and its final
    probabilities of "generated" for the test rows."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Critic(WIDTH)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    target = torch.cat([torch.ones(BATCH), torch.zeros(BATCH)])  # the critic's logit says "real"
    accs: dict[int, float] = {}
    for step in range(1, max(steps) + 1):
        net.train()
        ia = torch.randint(len(a), (BATCH,), generator=g)
        ib = torch.randint(len(b), (BATCH,), generator=g)
        x = augment_d4(torch.cat([a[ia], b[ib]]), g)
        loss = F.binary_cross_entropy_with_logits(net(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in steps:
            # Its own generator: the training draws do not depend on which budgets are measured.
            recalibrate_batchnorm(net, a, b, torch.Generator().manual_seed(seed + step))
            p_a, p_b = _p_fake(net.eval(), test[0]), _p_fake(net, test[1])
            accs[step] = _accuracy(p_a, p_b)
    return accs, p_a, p_b


# Training batches the BatchNorm statistics are re-estimated on before each held-out measurement.
RECALIBRATION_BATCHES = 20


@torch.no_grad()
def recalibrate_batchnorm(net: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, g: torch.Generator,
                          batches: int = RECALIBRATION_BATCHES) -> None:
    """Re-estimate the running statistics of ``net``'s BatchNorm layers with its current weights,
    as a plain average over ``batches`` training batches of both sets (Wu & Johnson 2021, "Rethinking
    'Batch' in BatchNorm", precise BN). Why: the running averages (momentum 0.1) trail weights that
    change fast early in training; with them the held-out logits of a classifier that separates its
    training batches perfectly fell all on one side (accuracy 0.50, or 0.9 in the other fold of the
    same test), so the accuracy measured how stale the statistics were, not the two sets."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    net.train()
    for _ in range(batches):
        ia = torch.randint(len(a), (BATCH,), generator=g)
        ib = torch.randint(len(b), (BATCH,), generator=g)
        net(augment_d4(torch.cat([a[ia], b[ib]]), g))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


@torch.no_grad()
def _p_fake(net: Critic, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    return np.concatenate([torch.sigmoid(-net(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])


def two_sample_test(real: np.ndarray, generated: np.ndarray, seed: int = 0, folds: int = FOLDS,
                    steps: tuple[int, ...] | int = STEPS) -> TwoSampleResult:
    """Classifier two-sample test between ``real`` (set A) and ``generated`` (set B).

    Both are (N, S, S, 3) uint8 of one size; the larger is cut to the size of the smaller with
    the seed, so both sets count alike. ``steps``: the training budgets measured (the last is
    the headline is the last). Deterministic for a seed.
    """
    steps = (int(steps),) if isinstance(steps, int) else tuple(sorted({int(k) for k in steps}))
    if np.shape(real)[1:] != np.shape(generated)[1:]:
        raise ValueError(f"both sets must be images of one size, got {np.shape(real)} and {np.shape(generated)}")
    n = min(len(real), len(generated))
    if n < 2 * folds:
        raise ValueError(f"a two-sample test with {folds} folds needs at least {2 * folds} images per set, got {n}")
    rng = np.random.default_rng(seed)
    ia, ib = rng.permutation(len(real))[:n], rng.permutation(len(generated))[:n]
    a, b = to_tensor(real[ia]), to_tensor(generated[ib])
    fold_of = np.arange(n) % folds  # rows are already shuffled
    p_a, p_b = np.zeros(n), np.zeros(n)
    accs: dict[int, list[float]] = {k: [] for k in steps}
    for f in range(folds):
        test, train = fold_of == f, fold_of != f
        fold_accs, p_a[test], p_b[test] = _train(a[train], b[train], (a[test], b[test]), steps, seed * 1000 + f)
        for k in steps:
            accs[k].append(fold_accs[k])
    # Back in each set's given order (the order the caller's images are in).
    out_a, out_b = np.full(len(real), np.nan), np.full(len(generated), np.nan)
    out_a[ia], out_b[ib] = p_a, p_b
    return TwoSampleResult(steps, accs, n, out_a, out_b)


def split_halves(images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of one set (the floor's two samples)."""
    idx = np.random.default_rng(seed + 1).permutation(len(images))
    half = len(images) // 2
    return images[idx[:half]], images[idx[half:2 * half]]


def surest(real: np.ndarray, generated: np.ndarray, result: TwoSampleResult,
           k: int = SHOW) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` generated images the classifier is surest are generated and the ``k`` real ones
    it is surest are real, with their held-out probabilities of being generated."""
    pb, pa = result.p_fake_b, result.p_fake_a
    fake = np.argsort(-np.nan_to_num(pb, nan=-1.0))[:k]
    true = np.argsort(np.nan_to_num(pa, nan=2.0))[:k]
    return generated[fake], pb[fake], real[true], pa[true]


def too_few_images(n_real: int, n_generated: int, folds: int = FOLDS) -> str | None:
    """Why the realism test cannot run on sets of these sizes (its floor splits the real set in
    two, and every set needs two images per fold on each side), or None when it can."""
    need = 4 * folds
    if n_real < need or n_generated < 2 * folds:
        return (f"the realism test with {folds} folds needs at least {need} real and {2 * folds} generated "
                f"images, got {n_real} and {n_generated}")
    return None


def realism_scores(real: np.ndarray, generated: np.ndarray, means: np.ndarray | None, seed: int = 0,
                   folds: int = FOLDS, steps: tuple[int, ...] = STEPS) -> tuple[dict[str, Any], TwoSampleResult]:
    """The realism section of an evaluation: the two-sample test of the generated images (and of
    their decoder means, when given) against the real ones, and of two halves of the real set
    (the floor). Returns the summary and the generated images' test (for the figure)."""
    gen = two_sample_test(real, generated, seed, folds, steps)
    out: dict[str, Any] = {"method": "classifier two-sample test (Lopez-Paz & Oquab 2017)", "folds": folds,
                           "steps": list(gen.steps), "batch_per_set": BATCH, "generated": gen.summary()}
    if means is not None:
        out["means"] = two_sample_test(real, means, seed, folds, steps).summary()
    half_a, half_b = split_halves(real, seed)
    out["floor"] = two_sample_test(half_a, half_b, seed, folds, steps).summary()
    for k in gen.steps:
        parts = [f"samples {out['generated']['by_steps'][str(k)]['accuracy']:.3f} "
                 f"± {out['generated']['by_steps'][str(k)]['spread']:.3f}"]
        if means is not None:
            parts.append(f"decoder means {out['means']['by_steps'][str(k)]['accuracy']:.3f}")
        parts.append(f"floor (real vs real) {out['floor']['by_steps'][str(k)]['accuracy']:.3f}")
        log(f"realism after {k} steps: a classifier tells from real: {', '.join(parts)} (0.5 = cannot tell)")
    return out, gen
