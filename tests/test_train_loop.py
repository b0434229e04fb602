"""Pieces of the training loop that need no cluster: the LR schedule, the gradient guard and the
settings they read."""

import math

import pytest
import torch

from ray_galaxy.config import ConfigError, TrainConfig, resolve
from ray_galaxy.config import PRESETS
from ray_galaxy.training.group import group_line
from ray_galaxy.training.loop import LR_FLOOR, GradGuard, lr_at


def test_cosine_schedule_starts_at_lr_and_ends_at_the_floor():
    cfg = TrainConfig(epochs=11, lr=1e-3)
    lrs = [lr_at(cfg, e) for e in range(11)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(LR_FLOOR * 1e-3)
    assert lrs[5] == pytest.approx(1e-3 * (1 + LR_FLOOR) / 2)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_constant_schedule_and_seed_preset_keep_the_original_training():
    assert lr_at(TrainConfig(epochs=5, lr_schedule="constant", lr=3e-4), 4) == 3e-4
    seed = resolve(TrainConfig, None, {"preset": "seed"}, PRESETS)
    assert seed.lr_schedule == "constant" and not seed.fit_sampler and seed.grad_clip == TrainConfig().grad_clip


@pytest.mark.parametrize("bad", [dict(lr_schedule="step"), dict(grad_clip=0.5), dict(grad_clip=-1),
                                 dict(cache="sometimes")])
def test_bad_schedule_or_clip_is_rejected(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        TrainConfig(**bad)


def _grads(*values):
    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in values]
    for p, v in zip(ps, values):
        p.grad = torch.tensor([float(v)])
    return ps


def test_guard_clips_a_spike_to_a_multiple_of_the_median_norm():
    g = GradGuard(multiple=5)
    for _ in range(30):
        assert g(_grads(3.0, 4.0))  # norm 5
    spike = _grads(3000.0, 4000.0)
    assert g(spike)
    clipped = math.hypot(spike[0].grad.item(), spike[1].grad.item())
    assert clipped == pytest.approx(25.0, rel=1e-4) and g.clipped == 1
    small = _grads(0.3, 0.4)
    assert g(small) and small[0].grad.item() == pytest.approx(0.3)  # below the limit: untouched


def test_guard_does_not_clip_before_it_has_seen_enough_steps():
    g = GradGuard(multiple=5)
    big = _grads(1e6)
    assert g(big) and big[0].grad.item() == 1e6 and g.clipped == 0


def test_guard_skips_non_finite_steps_and_gives_up_after_too_many():
    g = GradGuard(multiple=5, max_consecutive_skips=3)
    assert not g(_grads(float("nan"), 1.0))
    assert g(_grads(1.0))  # a finite step resets the run of skips
    assert not g(_grads(float("inf")))
    assert not g(_grads(float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite"):
        g(_grads(float("nan")))
    assert g.skipped == 4


def test_group_line_says_how_the_worker_group_changed():
    """The line rank 0 prints when a (resized or restarted) group starts: the counts, which node
    left or joined, and the epoch training resumes after."""
    a, b = "a" * 40, "b" * 40
    assert group_line([a, b]) == "workers: 2 on 2 node(s) (aaaaaaaa, bbbbbbbb)"
    lost = group_line([a], {"epoch": 5, "node_ids": [a, b]})
    assert lost == "workers 2 -> 1: node bbbbbbbb lost; resuming from checkpoint after epoch 5"
    back = group_line([a, b], {"epoch": 7, "node_ids": [a]})
    assert back == "workers 1 -> 2: node bbbbbbbb joined; resuming from checkpoint after epoch 7"
    spot = group_line([a], {"epoch": 6, "node_ids": [a, b], "preempted": [b]})
    assert spot == "workers 2 -> 1: node bbbbbbbb preempted; resuming from checkpoint after epoch 6"
    same = group_line([a], {"epoch": 3, "node_ids": [a], "with_critic": True})
    assert same == "workers: 1; resuming from checkpoint after epoch 3 (with its critic)"
