"""The three architectures: shapes, ELBO terms against scipy, training, gradient flow, layer sizes."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from exvae_dist.config import ModelConfig, load
from exvae_dist.core.models import build_net
from exvae_dist.core.objective import build_model

ARCHS = ["vae", "hvae", "convhvae"]
B, D, Z = 4, 784, 40


def _binary_batch(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, D, generator=g) < 0.2).to(dtype)


def _net(arch: str):
    torch.manual_seed(0)
    return build_net(ModelConfig(arch=arch)).double()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def _gauss(z, mean, logvar) -> np.ndarray:
    """Brute-force diagonal Gaussian log-density, summed over the last axis."""
    return norm.logpdf(_np(z), loc=_np(mean), scale=np.exp(0.5 * _np(logvar))).sum(-1)


def _bernoulli(logits, x) -> np.ndarray:
    """log Bernoulli(x; sigmoid(logits)) = x * l - log(1 + e^l), summed over pixels."""
    lg, xx = _np(logits), _np(x)
    return (xx * lg - np.logaddexp(0.0, lg)).sum(-1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_samples", [1, 3])
def test_shapes_of_encode_terms_and_decode(arch, n_samples):
    net = _net(arch)
    x = _binary_batch(B)
    with torch.no_grad():
        mean, logvar = net.encode_top(x)
        t = net.terms(x, n_samples)
        t_top = net.terms(x, n_samples, top=(mean, logvar))
        probs = net.decode_top(torch.randn(B, Z, dtype=torch.float64))
        probs_s = net.decode_top(torch.randn(n_samples, B, Z, dtype=torch.float64))
    assert net.top_dim == Z
    assert mean.shape == logvar.shape == (B, Z)
    assert logvar.min() >= -6.0 and logvar.max() <= 2.0
    for terms in (t, t_top):
        assert terms.z_top.shape == (n_samples, B, Z)
        for name in ("log_px", "log_q", "log_p_cond"):
            value = getattr(terms, name)
            assert value.shape == (n_samples, B), name
            assert torch.isfinite(value).all(), name
    assert probs.shape == (B, D) and probs_s.shape == (n_samples, B, D)
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    assert probs_s.min() >= 0.0 and probs_s.max() <= 1.0


def test_vae_terms_match_scipy():
    net = _net("vae")
    x = _binary_batch(B)
    with torch.no_grad():
        t = net.terms(x, 3)
        mean, logvar = net.encode_top(x)
        logits = net.decoder(t.z_top)
    np.testing.assert_allclose(_np(t.log_q), _gauss(t.z_top, mean, logvar), rtol=1e-10)
    np.testing.assert_allclose(_np(t.log_px), _bernoulli(logits, x), rtol=1e-10)
    np.testing.assert_array_equal(_np(t.log_p_cond), 0.0)


@pytest.mark.parametrize("arch", ["hvae", "convhvae"])
@pytest.mark.parametrize("pass_top", [False, True])
def test_hierarchical_terms_match_scipy(arch, pass_top):
    """log_q = log q(z2|x) + log q(z1|x,z2), log_p_cond = log p(z1|z2), log_px = log p(x|z1,z2)."""
    net = _net(arch)
    x = _binary_batch(B)
    seen = {}
    # z1 is not returned by terms(); catch it where it enters the decoder.
    hook = net.p_x_z1.register_forward_pre_hook(lambda m, args: seen.__setitem__("z1", args[0]))
    with torch.no_grad():
        top = net.encode_top(x) if pass_top else None
        t = net.terms(x, 3, top=top)
        hook.remove()
        z1, z2 = seen["z1"], t.z_top
        assert z1.shape == z2.shape == (3, B, Z)
        mean2, logvar2 = net.encode_top(x)
        mean1, logvar1 = net.posterior_z1(x, z2)
        p_mean1, p_logvar1 = net.prior_z1(z2)
        logits = net.decoder_logits(z1, z2)
    np.testing.assert_allclose(_np(t.log_q),
                               _gauss(z2, mean2, logvar2) + _gauss(z1, mean1, logvar1), rtol=1e-10)
    np.testing.assert_allclose(_np(t.log_p_cond), _gauss(z1, p_mean1, p_logvar1), rtol=1e-10)
    np.testing.assert_allclose(_np(t.log_px), _bernoulli(logits, x), rtol=1e-10)


@pytest.mark.parametrize("arch", ["hvae", "convhvae"])
def test_hierarchical_sample_axis_does_not_mix_rows(arch):
    """Batched [S, B, d] evaluation equals one image and one sample at a time."""
    net = _net(arch)
    x = _binary_batch(B)
    z1 = torch.randn(2, B, Z, dtype=torch.float64)
    z2 = torch.randn(2, B, Z, dtype=torch.float64)
    with torch.no_grad():
        q1 = net.posterior_z1(x, z2)
        logits = net.decoder_logits(z1, z2)
        mean2, _ = net.encode_top(x)
        for s in range(2):
            for b in range(B):
                one = net.posterior_z1(x[b:b + 1], z2[s, b:b + 1])
                torch.testing.assert_close(one[0][0], q1[0][s, b])
                torch.testing.assert_close(one[1][0], q1[1][s, b])
                torch.testing.assert_close(net.decoder_logits(z1[s, b], z2[s, b]), logits[s, b])
                torch.testing.assert_close(net.encode_top(x[b:b + 1])[0][0], mean2[b])


@pytest.mark.parametrize("arch", ["hvae", "convhvae"])
def test_decode_top_puts_z1_at_the_mean_of_p_z1_given_z2(arch):
    net = _net(arch)
    z2 = torch.randn(B, Z, dtype=torch.float64)
    with torch.no_grad():
        expected = 1.0 / (1.0 + np.exp(-_np(net.decoder_logits(net.prior_z1(z2)[0], z2))))
        np.testing.assert_allclose(_np(net.decode_top(z2)), expected, rtol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_adam_steps_lower_the_gaussian_prior_loss(arch):
    torch.manual_seed(0)
    model = build_model(load(None, [f"model.arch={arch}", "prior.kind=gaussian"]))
    x = _binary_batch(8, seed=1, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_at_fixed_noise():
        torch.manual_seed(123)
        with torch.no_grad():
            return model(x, 1.0).loss.item()

    before = loss_at_fixed_noise()
    for _ in range(8):
        opt.zero_grad()
        model(x, 1.0).loss.backward()
        opt.step()
    after = loss_at_fixed_noise()
    assert after < before - 10.0, (before, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_parameter_with_the_exemplar_prior(arch):
    torch.manual_seed(0)
    model = build_model(load(None, [f"model.arch={arch}", "prior.kind=exemplar"]))
    x = _binary_batch(4, seed=1, dtype=torch.float32)
    exemplars = _binary_batch(6, seed=2, dtype=torch.float32)
    model(x, 1.0, exemplars=exemplars).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def _shapes(net) -> dict:
    return {name: tuple(p.shape) for name, p in net.named_parameters()}


def test_mlp_vae_is_gated_784_300_300_40_and_mirror():
    s = _shapes(_net("vae"))
    # A gated layer is one Linear of twice the width (value and gate halves).
    assert s["encoder.0.linear.weight"] == (600, 784)
    assert s["encoder.1.linear.weight"] == (600, 300)
    assert s["q_z.mean.weight"] == s["q_z.logvar.weight"] == (40, 300)
    assert s["decoder.0.linear.weight"] == (600, 40)
    assert s["decoder.1.linear.weight"] == (600, 300)
    assert s["decoder.2.weight"] == (784, 300)
    assert len(s) == 14


def test_hvae_layer_sizes_follow_the_vampprior_paper():
    s = _shapes(_net("hvae"))
    assert s["q_z2_net.0.linear.weight"] == (600, 784)
    assert s["q_z2_net.1.linear.weight"] == (600, 300)
    assert s["q_z2_head.mean.weight"] == (40, 300)
    assert s["q_z1_x.linear.weight"] == (600, 784)
    assert s["q_z1_z2.linear.weight"] == (600, 40)
    assert s["q_z1_joint.linear.weight"] == (600, 600)
    assert s["q_z1_head.logvar.weight"] == (40, 300)
    assert s["p_z1_net.0.linear.weight"] == (600, 40)
    assert s["p_z1_net.1.linear.weight"] == (600, 300)
    assert s["p_z1_head.mean.weight"] == (40, 300)
    assert s["p_x_z1.linear.weight"] == s["p_x_z2.linear.weight"] == (600, 40)
    assert s["p_x_joint.0.linear.weight"] == (600, 600)
    assert s["p_x_joint.1.weight"] == (784, 300)


def test_convhvae_layer_sizes_follow_the_vampprior_paper():
    s = _shapes(_net("convhvae"))
    # q(z2|x): 5 gated convs ending in 6 channels at 7x7 = 294 features.
    assert s["q_z2_convs.0.conv.weight"] == (64, 1, 7, 7)
    assert s["q_z2_convs.2.conv.weight"] == (128, 32, 5, 5)
    assert s["q_z2_convs.4.conv.weight"] == (12, 64, 3, 3)
    assert s["q_z2_head.mean.weight"] == (40, 294)
    assert s["q_z1_x.0.conv.weight"] == (64, 1, 3, 3)
    assert s["q_z1_z2.linear.weight"] == (588, 40)
    assert s["q_z1_joint.linear.weight"] == (600, 588)
    assert s["p_x_to_image.linear.weight"] == (2 * 784, 600)
    assert s["p_x_convs.3.conv.weight"] == (128, 64, 3, 3)
    assert s["p_x_convs.4.weight"] == (1, 64, 1, 1)


def test_convhvae_rejects_images_of_the_wrong_size():
    net = _net("convhvae")
    with pytest.raises(ValueError, match="image_shape"):
        net.encode_top(torch.zeros(2, 100, dtype=torch.float64))
