"""The realism test (a classifier two-sample test) can fail: ~0.5 on two halves of one real set,
~1.0 on real galaxies against blurred or noised copies of them."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from synthetic import galaxy

from ray_galaxy.evaluation.realism import realism_scores, split_halves, surest, too_few_images, two_sample_test

SIZE, N, STEPS = 32, 120, 200


@pytest.fixture(scope="module")
def real():
    rng = np.random.default_rng(0)
    return np.stack([galaxy(SIZE, rng) for _ in range(N)])


def test_two_halves_of_one_set_are_indistinguishable(real):
    a, b = split_halves(real, seed=0)
    assert len(a) == len(b) == N // 2 and not set(map(bytes, a)) & set(map(bytes, b))
    r = two_sample_test(a, b, seed=0, steps=(50, STEPS))
    assert 0.35 <= r.at(50) <= 0.65 and 0.35 <= r.at(STEPS) <= 0.65, r
    assert len(r.fold_accuracies[STEPS]) == 2 and r.n_per_set == N // 2 and r.accuracy == r.at(STEPS)


@pytest.mark.parametrize("damage", ["blur", "noise"])
def test_blurred_or_noised_copies_are_told_apart(real, damage):
    if damage == "blur":
        fake = np.stack([gaussian_filter(r.astype(float), (1.0, 1.0, 0)) for r in real])
    else:
        fake = real + np.random.default_rng(1).normal(0, 8, real.shape)
    fake = np.clip(fake, 0, 255).round().astype(np.uint8)
    r = two_sample_test(real, fake, seed=0, steps=STEPS)
    assert r.accuracy >= 0.9, r
    # Every image got a held-out probability, and the surest fakes are the damaged images.
    assert np.isfinite(r.p_fake_a).all() and np.isfinite(r.p_fake_b).all()
    fakes, p_fake, trues, p_true = surest(real, fake, r, k=8)
    assert fakes.shape == (8, SIZE, SIZE, 3) and p_fake.min() > 0.5 > p_true.max()
    assert p_fake[0] == r.p_fake_b.max() and p_true[0] == r.p_fake_a.min()


def test_the_test_is_seeded_and_reports_means_and_floor(real):
    fake = np.clip(real.astype(int) + 30, 0, 255).astype(np.uint8)  # a brighter sky: easy to tell
    s1, t1 = realism_scores(real, fake, fake, seed=3, steps=40)
    s2, _ = realism_scores(real, fake, None, seed=3, steps=40)
    assert s1["generated"] == s2["generated"]  # same seed, same numbers
    assert "means" in s1 and "means" not in s2 and s1["floor"]["n_per_set"] == N // 2
    assert s1["generated"]["spread"] == pytest.approx(np.std(s1["generated"]["fold_accuracies"]))
    assert list(s1["generated"]["by_steps"]) == ["40"] and s1["steps"] == [40]


def test_sets_of_different_sizes_or_too_few_images_are_refused(real):
    with pytest.raises(ValueError, match="one size"):
        two_sample_test(real, real[:, :16, :16])
    with pytest.raises(ValueError, match="at least 4"):
        two_sample_test(real[:3], real[:3])


def test_an_evaluation_too_small_for_the_test_skips_it_and_says_why(real):
    from ray_galaxy.evaluation.report import _realism

    assert too_few_images(8, 4, folds=2) is None
    # the floor splits the real set in two: 7 real images leave a half too small for two folds
    reason = too_few_images(7, 40, folds=2)
    assert "at least 8 real" in reason and "got 7 and 40" in reason
    assert "12 real and 6 generated images, got 40 and 5" in too_few_images(40, 5, folds=3)
    with pytest.raises(ValueError):  # what the skip avoids: the floor's halves are too small
        realism_scores(real[:7], real[7:17], None, folds=2, steps=(2,))
    assert f"Not measured: {reason}." in _realism({"skipped": reason})


def test_a_difference_learnt_early_is_measured_in_every_fold_and_budget(real):
    """Held-out accuracy is measured with BatchNorm statistics re-estimated for the current
    weights: with the trailing running averages, a classifier that already separated its
    training batches put every held-out image on one side (0.50 in one fold, 0.9 in the other)."""
    fake = np.clip(real + np.random.default_rng(2).normal(0, 6, real.shape), 0, 255).round().astype(np.uint8)
    r = two_sample_test(real, fake, seed=0, steps=(60, 120))
    for k in (60, 120):
        assert min(r.fold_accuracies[k]) >= 0.85, r.fold_accuracies
