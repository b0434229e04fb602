"""Pieces of the training loop that need no cluster: the LR schedule and the gradient guard."""

import math

import pytest
import torch

from ray_galaxy.config import ConfigError, TrainConfig, resolve
from ray_galaxy.config import PRESETS
from ray_galaxy.train import LR_FLOOR, GradGuard, lr_at


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


@pytest.mark.parametrize("bad", [dict(lr_schedule="step"), dict(grad_clip=0.5), dict(grad_clip=-1)])
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


# --------------------------------------------------------------------------- adversarial term

from ray_galaxy.model import PatchDiscriminator  # noqa: E402
from ray_galaxy.train import adversarial_term, critic_step  # noqa: E402


@pytest.mark.parametrize("weight", [0.1, 1.0])
def test_adversarial_gradient_is_the_asked_fraction_of_the_vae_gradient(weight):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    out_a = torch.randn(4, 3, 32, 32, requires_grad=True)
    fake = (torch.tanh(out_a) + 1) / 2
    # A likelihood term of any scale: the adaptive weight must cancel the scale.
    vae_loss = 1e4 * (fake - x).pow(2).sum((1, 2, 3)).mean()
    critic = PatchDiscriminator().eval()  # eval: spectral norm's power iteration stays put
    adv_loss, lam = adversarial_term(critic, [out_a], vae_loss, weight)
    g_vae = torch.autograd.grad(vae_loss, out_a, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, out_a, retain_graph=True)[0]
    g_critic = torch.autograd.grad(-critic(fake).mean(), out_a)[0]  # what the decoder should follow
    assert lam > 0
    assert g_adv.norm().item() == pytest.approx(weight * g_vae.norm().item(), rel=1e-4)
    cos = torch.nn.functional.cosine_similarity(g_adv.flatten(), g_critic.flatten(), dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-5)
    assert g_adv.norm().item() == pytest.approx(lam * g_critic.norm().item(), rel=1e-4)


def test_adversarial_term_survives_a_critic_with_a_vanishing_gradient():
    out_a = torch.randn(2, 3, 32, 32, requires_grad=True)
    fake = (torch.tanh(out_a) + 1) / 2
    vae_loss = fake.sum()
    critic = PatchDiscriminator()
    for p in critic.parameters():  # a critic that says the same thing of every image
        torch.nn.init.zeros_(p)
    adv_loss, lam = adversarial_term(critic, [out_a], vae_loss, 0.5)
    assert lam == 0.0
    (vae_loss + adv_loss).backward()
    assert torch.isfinite(out_a.grad).all()


def test_every_decoded_output_gets_the_same_adversarial_gradient_norm():
    torch.manual_seed(1)
    x = torch.rand(4, 3, 32, 32)
    recon_a = torch.randn(4, 3, 32, 32, requires_grad=True)
    mix_a = torch.randn(4, 3, 32, 32, requires_grad=True)  # decodes of codes with no target image
    vae_loss = 50 * ((torch.tanh(recon_a) + 1) / 2 - x).pow(2).sum()
    adv_loss, _ = adversarial_term(PatchDiscriminator().eval(), [recon_a, mix_a], vae_loss, 0.3)
    g_vae = torch.autograd.grad(vae_loss, recon_a, retain_graph=True)[0]
    g_recon, g_mix = torch.autograd.grad(adv_loss, [recon_a, mix_a])
    assert g_recon.norm().item() == pytest.approx(0.3 * g_vae.norm().item(), rel=1e-4)
    assert g_mix.norm().item() == pytest.approx(0.3 * g_vae.norm().item(), rel=1e-4)


def test_interpolated_codes_lie_between_neighbours_in_the_batch():
    from ray_galaxy.train import interpolated_codes

    mu = torch.randn(8, 5)
    z = interpolated_codes(mu, torch.Generator().manual_seed(0))
    other = mu.roll(1, dims=0)
    a = (z - other) / (mu - other)  # the same mixing weight in every dimension of a row
    assert torch.allclose(a, a[:, :1].expand_as(a), atol=1e-4)
    assert ((a[:, 0] >= 0) & (a[:, 0] <= 1)).all() and a[:, 0].std() > 0.05


def test_critic_learns_to_tell_sharp_images_from_blurred_ones():
    torch.manual_seed(0)
    real = (torch.rand(16, 3, 32, 32) > 0.9).float()  # sharp point sources
    fake = torch.nn.functional.avg_pool2d(real, 5, stride=1, padding=2)  # the same, blurred
    critic = PatchDiscriminator()
    opt = torch.optim.Adam(critic.parameters(), lr=2e-3, betas=(0.5, 0.9))
    first = critic_step(critic, opt, real, fake)
    for _ in range(30):
        last = critic_step(critic, opt, real, fake)
    assert last < first
    with torch.no_grad():
        assert critic(real).mean() > critic(fake).mean()


def test_adversarial_weight_is_off_then_ramps_up():
    from ray_galaxy.train import ADV_RAMP_EPOCHS, adv_weight_at

    cfg = TrainConfig(adv_weight=0.6, adv_start_epoch=4)
    w = [adv_weight_at(cfg, e) for e in range(4 + ADV_RAMP_EPOCHS + 3)]
    assert w[:4] == [0.0] * 4
    assert 0 < w[4] < w[5] < 0.6 and w[-1] == pytest.approx(0.6)
    assert adv_weight_at(TrainConfig(), 50) == 0.0  # off by default


def test_adversarial_settings_are_checked():
    with pytest.raises(ConfigError, match="adv_weight"):
        TrainConfig(adv_weight=-0.1)
    with pytest.raises(ConfigError, match="adv_start_epoch"):
        TrainConfig(adv_start_epoch=-1)
