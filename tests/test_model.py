"""ConvVAE: shapes, the KL formula, the reparameterization, determinism, likelihoods."""

import math

import pytest
import torch

from ray_galaxy.config import ConfigError, ModelConfig
from ray_galaxy.generation.latents import prior_latents
from ray_galaxy.model import ConvVAE, ResBlock, to_uint8


@pytest.mark.parametrize("size", [32, 64, 128, 256])
@pytest.mark.parametrize("blocks", [0, 1])
def test_shapes_for_every_size(size, blocks):
    cfg = ModelConfig(image_size=size, channels=(8, 8, 16, 16), latent_dim=5, blocks_per_stage=blocks)
    m = ConvVAE(cfg)
    x = torch.rand(2, 3, size, size)
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (2, 5)
    a, mu, logvar = m(x)
    assert a.shape == (2, 3, size, size)
    assert m.decode(torch.zeros(3, 5)).shape == (3, 3, size, size)
    assert m.reconstruct(x).shape == (2, 3, size, size)


def test_residual_blocks_start_as_the_identity_and_then_learn():
    torch.manual_seed(0)
    block, x = ResBlock(16), torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), x)  # a deeper network starts as the shallower one
    (block(x) - 2 * x).pow(2).mean().backward()
    torch.optim.SGD(block.parameters(), lr=0.1).step()
    assert not torch.equal(block(x), x)  # the zero conv still gets a gradient


def test_seed_preset_is_four_stride2_convs_without_pooling():
    cfg = ModelConfig(image_size=256, latent_dim=4, likelihood="bce", blocks_per_stage=0)
    m = ConvVAE(cfg)
    convs = [layer for layer in m.encoder if isinstance(layer, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 4
    assert [c.out_channels for c in convs] == list(cfg.channels)
    assert not any(isinstance(layer, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)) for layer in m.modules())
    assert m.fc_mu.out_features == m.fc_logvar.out_features == 4


@pytest.mark.parametrize("bad", [dict(image_size=48), dict(image_size=16), dict(image_size=512),
                                 dict(latent_dim=0), dict(likelihood="mse")])
def test_invalid_model_config_is_rejected(bad):
    with pytest.raises(ConfigError):
        ModelConfig(**bad)


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu = torch.randn(3, 4)
    logvar = torch.randn(3, 4) * 0.5
    closed = ConvVAE.kl(mu, logvar)
    z = ConvVAE.reparameterize(mu.expand(200_000, 3, 4), logvar.expand(200_000, 3, 4))
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(closed, mc, atol=0.03), (closed, mc)


def test_reparameterization_uses_standard_deviation_not_variance():
    mu = torch.zeros(100_000, 1)
    logvar = torch.full((100_000, 1), math.log(4.0))  # variance 4 -> std 2
    z = ConvVAE.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(0))
    assert z.std().item() == pytest.approx(2.0, rel=0.02)


def test_gradients_flow_through_reparameterization():
    m = ConvVAE(ModelConfig(image_size=32, channels=(8, 16), latent_dim=3))
    x = torch.rand(4, 3, 32, 32)
    m.loss(x)["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith(("encoder", "fc_mu", "fc_logvar")):
            assert p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_same_seed_same_images_different_seed_different_images():
    m = ConvVAE(ModelConfig(image_size=32, channels=(8, 16), latent_dim=3)).eval()
    a, b, c = (m.decode(prior_latents(3, 4, seed=s)) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_bce_matches_torch_cross_entropy_on_tanh_output():
    m = ConvVAE(ModelConfig(image_size=32, channels=(8, 16), latent_dim=3, likelihood="bce"))
    a = torch.randn(2, 3, 32, 32)
    x = torch.rand(2, 3, 32, 32)
    mean = (torch.tanh(a) + 1) / 2
    ref = torch.nn.functional.binary_cross_entropy(mean, x, reduction="none").flatten(1).sum(1)
    assert torch.allclose(m.recon_nll(a, x), ref, rtol=1e-4)


def test_gaussian_nll_matches_normal_log_prob():
    m = ConvVAE(ModelConfig(image_size=32, channels=(8, 16), latent_dim=3)).eval()
    m.log_sigma.fill_(math.log(0.1))
    a, x = torch.randn(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    mean = (torch.tanh(a) + 1) / 2
    ref = -torch.distributions.Normal(mean, 0.1).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(m.recon_nll(a, x), ref, rtol=1e-4)


def test_gaussian_sigma_is_learned_as_the_maximum_likelihood_value():
    """In training the batch's optimal sigma = RMS error is used and tracked in the buffer."""
    m = ConvVAE(ModelConfig(image_size=32, channels=(8, 16), latent_dim=3)).train()
    a, x = torch.zeros(2, 3, 32, 32), torch.full((2, 3, 32, 32), 0.5)
    x[0] += 0.05
    x[1] -= 0.05  # mean is 0.5 everywhere: RMS error exactly 0.05
    ref = -torch.distributions.Normal(torch.full_like(x, 0.5), 0.05).log_prob(x).flatten(1).sum(1)
    for _ in range(200):
        nll = m.recon_nll(a, x)
    assert torch.allclose(nll, ref, rtol=1e-4)
    assert m.log_sigma.exp().item() == pytest.approx(0.05, rel=1e-3)


def test_loss_decreases_when_fitting_a_batch():
    torch.manual_seed(0)
    m = ConvVAE(ModelConfig(image_size=32, channels=(16, 32), latent_dim=4))
    x = torch.rand(8, 3, 32, 32) * 0.2 + 0.4
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = m.loss(x)["loss"].item()
    for _ in range(40):
        loss = m.loss(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - abs(first) * 0.1


def test_bits_per_dim_of_gaussian_includes_quantisation_offset():
    m = ConvVAE(ModelConfig(image_size=32, channels=(8, 16), latent_dim=3))
    d = 3 * 32 * 32
    assert m.bits_per_dim(torch.tensor(0.0)).item() == pytest.approx(math.log2(255))
    assert m.bits_per_dim(torch.tensor(d * math.log(2))).item() == pytest.approx(1 + math.log2(255))


def test_to_uint8_layout_and_range():
    x = torch.tensor([[[[0.0, 1.0]], [[0.5, 2.0]], [[-1.0, 0.25]]]])  # (1, 3, 1, 2)
    u = to_uint8(x)
    assert u.shape == (1, 1, 2, 3) and u.dtype == torch.uint8
    assert u[0, 0, 0].tolist() == [0, 128, 0] and u[0, 0, 1].tolist() == [255, 255, 64]


def test_decoded_pixels_do_not_depend_on_batch_composition():
    """A latent gives the same 8-bit image alone or inside any batch (needed for served PNGs)."""
    torch.manual_seed(0)
    m = ConvVAE(ModelConfig(image_size=64, channels=(16, 32, 64, 64), latent_dim=6)).eval()
    z = torch.randn(33, 6)
    full = to_uint8(m.decode(z))
    for i in (0, 7, 32):
        assert torch.equal(to_uint8(m.decode(z[i:i + 1]))[0], full[i])
    assert torch.equal(to_uint8(m.decode(z[5:12])), full[5:12])


def test_decode_follows_weight_changes():
    """decode() caches a float64 decoder; changed weights must invalidate it."""
    torch.manual_seed(0)
    m = ConvVAE(ModelConfig(image_size=32, channels=(8, 16), latent_dim=3)).eval()
    z = torch.randn(2, 3)
    a = m.decode(z)
    assert torch.equal(a, m.decode(z))
    other = ConvVAE(ModelConfig(image_size=32, channels=(8, 16), latent_dim=3))
    m.load_state_dict(other.state_dict())
    assert torch.allclose(m.decode(z), other.eval().decode(z))
    assert not torch.allclose(m.decode(z), a)
    with torch.no_grad():
        m.fc_dec.bias.add_(1.0)
    assert not torch.allclose(m.decode(z), other.decode(z))
    assert not any("cache" in k for k in m.state_dict())


def test_decode_precision_is_float64_on_cpu_and_float32_on_accelerators():
    from ray_galaxy.model import decode_dtype

    assert decode_dtype("cpu") == torch.float64
    assert decode_dtype(torch.device("cuda", 0)) == decode_dtype("cuda") == torch.float32
    torch.manual_seed(0)
    m = ConvVAE(ModelConfig(image_size=32, channels=(8, 16), latent_dim=3)).eval()
    z = torch.randn(64, 3)
    f64 = m.decode(z)
    assert torch.equal(f64, m.decode(z, dtype=torch.float64))
    # float32 and bfloat16 decodes differ from float64 by rounding only: under one 8-bit level
    # (float32) and a few (bfloat16, 8 bits of mantissa).
    assert (m.decode(z, dtype=torch.float32) - f64).abs().max() < 1 / 255
    assert (m.decode(z, dtype=torch.bfloat16) - f64).abs().max() < 8 / 255
    # byte-reproducible across batch sizes in the CPU default
    assert torch.equal(torch.cat([m.decode(z[:5]), m.decode(z[5:])]), f64)


def test_an_encoder_that_blows_up_gives_a_finite_kl_and_gradients():
    from ray_galaxy.model import LOGVAR_MAX, LOGVAR_MIN

    m = ConvVAE(ModelConfig(image_size=32, channels=(8, 16), latent_dim=3))
    with torch.no_grad():
        m.fc_logvar.bias.copy_(torch.tensor([200.0, -200.0, 0.0]))  # exp(200) overflows float32
    x = torch.rand(2, 3, 32, 32)
    mu, logvar = m.encode(x)
    assert logvar[:, 0].eq(LOGVAR_MAX).all() and logvar[:, 1].eq(LOGVAR_MIN).all()
    out = m.loss(x)
    assert torch.isfinite(out["kl"]) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
