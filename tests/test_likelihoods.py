"""The discretized logistic mixture against a brute-force sum over the 256 bins (scipy's
logistic CDF), and the decoder / data path that use it."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import logistic

from exvae_dist.core.models.likelihoods import (DiscretizedLogisticMixture, build_likelihood,
                                                log_sigmoid_difference)


def _brute_force_bin_probs(log_pi, means, log_s):
    """[K, D] mixture parameters -> P(level k) [256, D]: CDF differences at the bin edges
    (-inf below level 0, +inf above level 255), float64."""
    edges = np.concatenate([[-np.inf], (2 * np.arange(255) + 1) / 255.0 - 1.0, [np.inf]])  # 257
    t = (edges[:, None, None] - means[None]) / np.exp(log_s)[None]  # [257, K, D]
    # CDF differences left of the component's mean, survival-function differences right of
    # it: 1 - CDF would lose the right tail to cancellation in float64
    by_cdf = np.diff(logistic.cdf(t), axis=0)
    by_sf = -np.diff(logistic.sf(t), axis=0)
    comp = np.where(t[1:] + t[:-1] > 0, by_sf, by_cdf)  # [256, K, D]
    return (np.exp(log_pi)[None] * comp).sum(1)


def _random_params(k, d, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3 * k * d, generator=g, dtype=torch.float64) * spread


@pytest.mark.parametrize("k", [1, 3])
def test_dlogistic_log_prob_matches_a_brute_force_sum_over_the_256_bins(k):
    lik = DiscretizedLogisticMixture(k)
    d = 7
    params = _random_params(k, d, seed=k)
    params[2 * k * d:] = params[2 * k * d:] - 2.0  # scales from ~e^-4 to ~e^0
    log_pi, means, log_s = (t.numpy() for t in lik.split(params))
    probs = _brute_force_bin_probs(log_pi, means, log_s)
    # every level of every sub-pixel, including both open end bins
    levels = np.array([[0, 1, 17, 128, 200, 254, 255]] * 1, dtype=np.float64) / 255
    # 256 images whose sub-pixels together take every level
    ks = (np.arange(d)[None] * 37 + np.arange(256)[:, None]) % 256  # [256, D]
    ours = lik.log_prob(params[None], torch.from_numpy(ks / 255.0)).numpy()  # [256]
    want = np.log(probs[ks, np.arange(d)[None]]).sum(1)
    np.testing.assert_allclose(ours, want, rtol=1e-9)
    ours = lik.log_prob(params[None], torch.from_numpy(levels)).item()
    want = np.log(probs[(levels[0] * 255).round().astype(int), np.arange(d)]).sum()
    np.testing.assert_allclose(ours, want, rtol=1e-10)


def test_dlogistic_probabilities_sum_to_one_per_pixel():
    k, d = 4, 5
    lik = DiscretizedLogisticMixture(k)
    params = _random_params(k, d, seed=3, spread=2.0)
    all_levels = torch.arange(256, dtype=torch.float64)[:, None].expand(256, d) / 255.0
    # one row per level: log P(level) of each sub-pixel separately
    log_pi, means, log_s = lik.split(params)
    # log P(level) of each sub-pixel separately, every level at once: [256, D]
    per_pixel = torch.logsumexp(log_pi + lik.component_log_prob(means, log_s,
                                                                all_levels[:, None, :]), dim=-2)
    np.testing.assert_allclose(torch.logsumexp(per_pixel, 0).numpy(), 0.0, atol=1e-12)
    # float32 (what training uses) too, with means far outside the range
    p32 = params.float()
    p32[k * d:2 * k * d] *= 5.0
    lp = lik.log_prob(p32[None], all_levels.float())
    assert lp.shape == (256,) and torch.isfinite(lp).all()


def test_log_sigmoid_difference_is_finite_and_exact_in_far_tails():
    a = torch.tensor([-60.0, 60.0, 0.01, 30.0], dtype=torch.float64)
    b = a - 0.5
    with np.errstate(divide="ignore"):
        want = np.log(logistic.cdf(a.numpy()) - logistic.cdf(b.numpy()))
    # scipy loses the far tails to cancellation; compare with the exact tail forms there
    want[0] = logsumexp([a[0].item(), b[0].item()], b=[1, -1])  # sigma(t) ~ e^t for t << 0
    want[3] = logsumexp([-b[3].item(), -a[3].item()], b=[1, -1])  # 1 - sigma(t) ~ e^-t
    got = log_sigmoid_difference(a, b).numpy()
    np.testing.assert_allclose(got[[0, 2, 3]], want[[0, 2, 3]], rtol=1e-9)
    assert np.isfinite(got).all() and got[1] < -55


def test_dlogistic_samples_are_8_bit_levels_and_follow_the_means():
    k, d = 2, 4
    lik = build_likelihood("dlogistic", k)
    params = torch.zeros(3 * k * d)
    params[k * d:2 * k * d] = torch.tensor([-0.8, 0.0, 0.5, 0.9]).repeat(k)  # means per pixel
    params[2 * k * d:] = -5.0
    x = lik.sample(params.expand(2000, -1), torch.Generator().manual_seed(0))
    assert x.shape == (2000, d)
    np.testing.assert_allclose((x * 255).numpy(), np.round((x * 255).numpy()), atol=1e-4)
    np.testing.assert_allclose(x.mean(0).numpy(), [0.1, 0.5, 0.75, 0.95], atol=0.01)
    np.testing.assert_allclose(lik.mean(params).numpy(), [0.1, 0.5, 0.75, 0.95], atol=1e-6)


@pytest.mark.parametrize("arch", ["vae", "hvae", "convhvae"])
def test_dlogistic_decoder_gives_a_finite_elbo_on_colour_images(arch):
    from exvae_dist import config
    from exvae_dist.core.objective import build_model

    cfg = config.load(None, [f"model.arch={arch}", "model.likelihood=dlogistic",
                             "model.n_mixtures=2", "model.hidden=16", "model.z_dim=4",
                             "prior.kind=gaussian"])
    assert cfg.data.pixels == "8bit"
    model = build_model(cfg, (3, 8, 8))
    x = torch.randint(0, 256, (5, 3 * 64)).float() / 255
    out = model(x)
    assert out.elbo.shape == (5,) and torch.isfinite(out.elbo).all()
    out.loss.backward()
    assert model.net.decode_top(torch.zeros(2, 4)).shape == (2, 3 * 64)
