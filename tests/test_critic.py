"""The adversarial patch critic: its losses, the adaptive weight, a training step with it, its
schedule and its place in the training checkpoint (no cluster needed)."""

import contextlib

import pytest
import torch

from ray_galaxy.config import ConfigError, ModelConfig, TrainConfig
from ray_galaxy.critic import PatchCritic, adaptive_weight, critic_loss, generator_loss
from ray_galaxy.model import ConvVAE
from ray_galaxy.training.adversary import Adversary, start_epoch
from ray_galaxy.training.loop import GradGuard, train_step


def _vae() -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(ModelConfig(image_size=32, channels=(8, 8, 16, 16), latent_dim=4))


def _adversary(weight: float = 0.5) -> Adversary:
    torch.manual_seed(1)
    bare = PatchCritic()
    opt = torch.optim.Adam(bare.parameters(), lr=1e-3, betas=(0.5, 0.9))
    return Adversary(critic=bare, bare=bare, optimizer=opt, weight=weight)


def test_critic_gives_one_logit_per_patch():
    logits = PatchCritic()(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 1, 14, 14)


def test_hinge_losses():
    ones = torch.ones(4)
    # a critic sure of both (real >= 1, fake <= -1) has nothing left to learn
    assert critic_loss(2 * ones, -2 * ones) == 0
    # undecided (all zeros): 0.5 * (1 + 1)
    assert critic_loss(0 * ones, 0 * ones) == pytest.approx(1.0)
    # a fake scored as real is penalised in proportion
    assert critic_loss(ones, 3 * ones) == pytest.approx(0.5 * 4)
    assert generator_loss(torch.tensor([1.0, 3.0])) == pytest.approx(-2.0)


def test_adaptive_weight_matches_the_gradient_norms_at_the_last_layer():
    net = _vae()
    x = torch.rand(3, 3, 32, 32)
    a, mu, logvar = net(x)
    rec = net.recon_nll(a, x).mean()
    fake = (torch.tanh(a) + 1) / 2
    gen = generator_loss(PatchCritic()(fake))
    lam = adaptive_weight(rec, gen, net.last_layer())
    w = net.last_layer()
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_gen = torch.autograd.grad(lam * gen, w, retain_graph=True)[0]
    # after weighting, the adversarial gradient is as large as the reconstruction's
    assert g_gen.norm() == pytest.approx(float(g_rec.norm()), rel=1e-3)
    assert not lam.requires_grad


def test_a_step_with_the_critic_trains_both_and_keeps_the_likelihood_loss_reported():
    net, adv = _vae(), _adversary()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.rand(4, 3, 32, 32)
    critic0 = [p.detach().clone() for p in adv.bare.parameters()]
    dec0 = net.last_layer().detach().clone()
    step = train_step(net, opt, GradGuard(5.0), x, 0.1, contextlib.nullcontext, adv)
    assert step is not None and all(torch.isfinite(torch.tensor(step)))
    assert not torch.equal(dec0, net.last_layer())
    assert any(not torch.equal(a, b) for a, b in zip(critic0, adv.bare.parameters()))
    assert all(p.requires_grad for p in adv.bare.parameters())  # unfrozen after the generator pass
    m = adv.epoch_metrics()
    assert set(m) == {"critic_loss", "adv_lambda"} and m["adv_lambda"] > 0
    assert adv.epoch_metrics() == {}  # reset for the next epoch


def test_the_critic_term_changes_the_decoder_update():
    x = torch.rand(4, 3, 32, 32)
    updates = []
    for adv in (None, _adversary(weight=1.0)):
        net = _vae()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        torch.manual_seed(2)  # same reparameterisation noise in both
        train_step(net, opt, GradGuard(0), x, 0.1, contextlib.nullcontext, adv)
        updates.append(net.last_layer().detach().clone())
    assert not torch.allclose(updates[0], updates[1])


def test_the_term_starts_after_the_likelihood_phase():
    assert start_epoch(TrainConfig(epochs=40)) == 40  # off by default
    assert start_epoch(TrainConfig(epochs=40, adv_weight=0.5)) == 20
    assert start_epoch(TrainConfig(epochs=40, adv_weight=0.5, adv_start=0.0)) == 0
    for bad in (dict(adv_weight=-1), dict(adv_weight=float("inf")), dict(adv_start=1.0)):
        with pytest.raises(ConfigError, match="adv_"):
            TrainConfig(**bad)


def test_critic_and_its_optimiser_round_trip_through_a_checkpoint(tmp_path):
    adv = _adversary()
    net = _vae()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    train_step(net, opt, GradGuard(5.0), torch.rand(2, 3, 32, 32), 0.1, contextlib.nullcontext, adv)
    adv.save(tmp_path)
    fresh = _adversary()
    fresh.bare.apply(lambda m: torch.nn.init.zeros_(m.weight) if isinstance(m, torch.nn.Conv2d) else None)
    assert fresh.load(tmp_path)
    for a, b in zip(adv.bare.state_dict().values(), fresh.bare.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.optimizer.state_dict()["state"].keys() == adv.optimizer.state_dict()["state"].keys()
    assert not _adversary().load(tmp_path / "elsewhere")  # a checkpoint saved without the term
