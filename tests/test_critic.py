"""The adversarial critic: its losses, the adaptive weight, augmentation, the R1 penalty, a
fine-tuning step with it, when it has won, and its place in the training checkpoint (no
cluster needed; the whole phase in a job: tests/test_train_e2e.py)."""

import contextlib

import numpy as np
import pytest
import torch

from ray_galaxy.config import ConfigError, ModelConfig, TrainConfig
from ray_galaxy.critic import Critic, accuracy, adaptive_weight, critic_loss, diff_augment, generator_loss, r1_penalty
from ray_galaxy.generation.sampler import MixtureSampler, fit_codes
from ray_galaxy.images import orient_tensor
from ray_galaxy.model import ConvVAE
from ray_galaxy.training.adversary import Adversary, critic_won
from ray_galaxy.training.loop import GradGuard, finetune_step

POLICY = "translation,cutout,color"


def _vae() -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(ModelConfig(image_size=32, channels=(8, 8, 16, 16), latent_dim=4))


def _adversary(weight: float = 0.5, sampler: MixtureSampler | None = None, **kw) -> Adversary:
    cfg = TrainConfig(image_size=32, adv_weight=weight, finetune_lr=1e-3, critic_width=4,
                      adv_augment=kw.pop("policy", POLICY), **kw)
    return Adversary.build(cfg, sampler, seed=1)


def _sampler(net: ConvVAE) -> MixtureSampler:
    images = (np.random.default_rng(0).random((12, 32, 32, 3)) * 255).astype(np.uint8)
    tensors, meta, _ = fit_codes(net, images, components=2, orientations=2, bandwidth=0.3)
    return MixtureSampler(tensors, meta)


def test_critic_gives_one_logit_per_image_at_any_size():
    for size in (32, 64):
        assert Critic(4)(torch.rand(3, 3, size, size)).shape == (3,)


def test_hinge_losses_and_accuracy():
    ones = torch.ones(4)
    # a critic sure of both (real >= 1, fake <= -1) has nothing left to learn
    assert critic_loss(2 * ones, -2 * ones) == 0
    # undecided (all zeros): 0.5 * (1 + 1)
    assert critic_loss(0 * ones, 0 * ones) == pytest.approx(1.0)
    # a fake scored as real is penalised in proportion
    assert critic_loss(ones, 3 * ones) == pytest.approx(0.5 * 4)
    assert generator_loss(torch.tensor([1.0, 3.0])) == pytest.approx(-2.0)
    real = torch.tensor([1.0, 2.0, -1.0, 3.0])
    assert accuracy(real, -real) == (0.75, 0.75)


def test_adaptive_weight_matches_the_gradient_norms_at_the_last_layer():
    net = _vae()
    x = torch.rand(3, 3, 32, 32)
    a, mu, logvar = net(x)
    rec = net.recon_nll(a, x).mean()
    fake = (torch.tanh(a) + 1) / 2
    gen = generator_loss(Critic(4)(fake))
    lam = adaptive_weight(rec, gen, net.last_layer())
    w = net.last_layer()
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_gen = torch.autograd.grad(lam * gen, w, retain_graph=True)[0]
    # after weighting, the adversarial gradient is as large as the reconstruction's
    assert g_gen.norm() == pytest.approx(float(g_rec.norm()), rel=1e-3)
    assert not lam.requires_grad


def test_diff_augment_is_differentiable_seeded_and_changes_every_image():
    x = torch.rand(6, 3, 32, 32, requires_grad=True)
    y = diff_augment(x, ("translation", "cutout", "color"), torch.Generator().manual_seed(0))
    y2 = diff_augment(x, ("translation", "cutout", "color"), torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.equal(y, y2)
    assert all(not torch.allclose(y[i], x[i]) for i in range(6))
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(diff_augment(x, ()), x)
    # translation alone keeps the pixel values: it moves them, filling the rim with edge rows
    t = diff_augment(x, ("translation",), torch.Generator().manual_seed(1)).detach()
    assert set(t[0].flatten().tolist()) <= set(x[0].detach().flatten().tolist())


def test_d4_augment_turns_or_flips_each_image_and_keeps_its_pixels():
    x = torch.rand(16, 3, 32, 32, requires_grad=True)
    y = diff_augment(x, ("d4",), torch.Generator().manual_seed(0))
    assert torch.equal(y, diff_augment(x, ("d4",), torch.Generator().manual_seed(0)))
    # each image is one of its own eight orientations, and the batch does not all keep one
    orientations = [[torch.equal(y[i], orient_tensor(x[i:i + 1], o)[0]) for o in range(8)] for i in range(16)]
    assert all(any(o) for o in orientations) and len({o.index(True) for o in orientations}) > 1
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # a permutation of the pixels: every one counts once


def test_r1_penalty_is_zero_for_a_flat_critic_and_positive_otherwise():
    critic = Critic(4)
    real, fake = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert r1_penalty(critic, real, fake) > 0
    for p in critic.parameters():
        torch.nn.init.zeros_(p)
    assert r1_penalty(critic, real, fake) == 0


def test_a_finetuning_step_trains_the_decoder_and_the_critic_not_the_encoder():
    net = _vae()
    sampler = _sampler(net)
    adv = _adversary(sampler=sampler, adv_sample_share=0.5, r1_gamma=1.0)
    net.freeze_encoder()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    x = torch.rand(4, 3, 32, 32)
    enc0 = [p.detach().clone() for p in net.encoder.parameters()]
    dec0 = net.last_layer().detach().clone()
    critic0 = [p.detach().clone() for p in adv.critic.parameters()]
    step = finetune_step(net, opt, GradGuard(5.0), x, 0.1, contextlib.nullcontext, adv)
    assert step is not None and all(np.isfinite(step))
    assert not torch.equal(dec0, net.last_layer())
    assert all(torch.equal(a, b) for a, b in zip(enc0, net.encoder.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(critic0, adv.critic.parameters()))
    assert all(p.requires_grad for p in adv.critic.parameters())  # unfrozen after the generator pass
    m = adv.epoch_metrics()
    assert {"critic_loss", "adv_lambda", "critic_acc_real", "critic_acc_fake", "critic_r1"} <= set(m)
    assert m["adv_lambda"] > 0 and 0 <= m["critic_acc_real"] <= 1
    assert adv.epoch_metrics() == {}  # reset for the next epoch


def test_the_critic_judges_sampler_decodes_beside_reconstructions():
    net = _vae()
    adv = _adversary(sampler=_sampler(net), adv_sample_share=0.5)
    codes = adv.sample_codes(8)
    assert codes.shape == (4, 4)
    a, mu, logvar, extra = net(torch.rand(8, 3, 32, 32), codes)
    assert a.shape == (8, 3, 32, 32) and extra.shape == (4, 3, 32, 32)
    assert _adversary(sampler=None).sample_codes(8) is None  # without a sampler: reconstructions only


def test_a_critic_that_wins_outright_is_detected():
    won = {"critic_acc_real": 0.99, "critic_acc_fake": 0.97}
    even = {"critic_acc_real": 0.7, "critic_acc_fake": 0.5}
    assert critic_won([even, won, won, won]) and not critic_won([won, won, even])
    assert not critic_won([{"val_loss": 1.0}] * 5)


def test_finetuning_settings_are_checked():
    cfg = TrainConfig(epochs=40, finetune_epochs=8)
    assert cfg.total_epochs == 48 and TrainConfig(epochs=40).total_epochs == 40
    assert cfg.to_dict()["critic_width"] == 16 and cfg.adv_augment == "translation,color"
    for bad, name in [(dict(adv_weight=-1), "adv_weight"), (dict(adv_weight=float("inf")), "adv_weight"),
                      (dict(finetune_epochs=-1), "finetune_epochs"), (dict(adv_augment="zoom"), "zoom"),
                      (dict(r1_gamma=-1), "r1_gamma"), (dict(critic_width=0), "critic_width"),
                      (dict(critic_lr=0), "critic_lr")]:
        with pytest.raises(ConfigError, match=name):
            TrainConfig(**bad)


def test_critic_and_its_optimiser_round_trip_through_a_checkpoint(tmp_path):
    adv, net = _adversary(), _vae()
    net.freeze_encoder()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    finetune_step(net, opt, GradGuard(5.0), torch.rand(2, 3, 32, 32), 0.1, contextlib.nullcontext, adv)
    adv.save(tmp_path)
    fresh = _adversary()
    fresh.critic.apply(lambda m: torch.nn.init.zeros_(m.weight) if isinstance(m, torch.nn.Conv2d) else None)
    assert fresh.load(tmp_path)
    for a, b in zip(adv.critic.state_dict().values(), fresh.critic.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.optimizer.state_dict()["state"].keys() == adv.optimizer.state_dict()["state"].keys()
    assert not _adversary().load(tmp_path / "elsewhere")  # a checkpoint saved without the critic
