"""The ELBO and the importance-sampled log-likelihood against numerical integration.

A model small enough to integrate: a 2-D latent, 4 binary pixels (16 possible images),
decoder logits = W z + b, and a table encoder (one Gaussian q per image). The exact
log p(x) = log of the integral of p(x|z) p(z) dz is a Riemann sum on a fine grid in float64
numpy/scipy; with Gaussian-tailed integrands and a step of 0.05 (every density here has s >= 0.3)
its error is far below 1e-6 nats.
"""

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import log_expit, logsumexp

from exvae_dist.core.models.base import LatentTerms, LatentVariableModel
from exvae_dist.core.objective import (VAEWithPrior, importance_log_likelihood, kl_beta,
                                       learning_rate)
from exvae_dist.core.priors import ExemplarPrior, GaussianPrior, exemplar_log_prob

F64 = torch.float64
D, X_DIM = 2, 4
W = np.array([[2.0, -1.0], [0.5, 1.5], [-1.5, -0.5], [1.0, 1.0]])
B = np.array([0.3, -0.2, 0.1, -0.5])
# all 16 binary images; pattern n has pixel j = bit j of n
PATTERNS = ((np.arange(16)[:, None] >> np.arange(X_DIM)[None, :]) & 1).astype(np.float64)
# four modes ~3 kernel widths apart: multimodal, yet a Gaussian q is a usable proposal
# (per-image s.d. of the S=20000 estimate <= 0.005 nats over seeds 0-4, so 0.02 is 4 s.d.)
CENTRES = 0.6 * np.array([[-1.5, 0.0], [1.0, 1.2], [0.5, -1.5], [2.0, -0.3]])
EX_LOG_VAR = np.log(0.25)  # exemplar kernel s = 0.5


class TinyNet(LatentVariableModel):
    """logits = W z + b; q(z|x) = Normal(table_mean[x], diag(exp(table_logvar[x])))."""

    top_dim = D

    def __init__(self, table_mean, table_logvar):
        super().__init__()
        self.table_mean = torch.nn.Parameter(torch.as_tensor(table_mean, dtype=F64).clone())
        self.table_logvar = torch.nn.Parameter(torch.as_tensor(table_logvar, dtype=F64).clone())
        self.register_buffer("w", torch.as_tensor(W, dtype=F64))
        self.register_buffer("b", torch.as_tensor(B, dtype=F64))

    def encode_top(self, x):
        idx = (x @ (2.0 ** torch.arange(X_DIM, dtype=x.dtype))).round().long()
        return self.table_mean[idx], self.table_logvar[idx]

    def terms(self, x, n_samples=1, top=None):
        mean, logvar = self.encode_top(x) if top is None else top
        eps = torch.randn((n_samples,) + mean.shape, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * eps
        logits = z @ self.w.t() + self.b
        log_px = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none").sum(-1)
        log_q = (-0.5 * (np.log(2 * np.pi) + logvar + (z - mean) ** 2 / logvar.exp())).sum(-1)
        return LatentTerms(log_px=log_px, log_q=log_q, log_p_cond=torch.zeros_like(log_px),
                           z_top=z)

    def decode_top(self, z_top):
        return torch.sigmoid(z_top @ self.w.t() + self.b)


# ---------------------------------------------------------------- numpy references

def np_log_lik(z, x):
    """log p(x|z): z [G, 2], x [K, 4] -> [G, K]."""
    logits = z @ W.T + B
    return log_expit(logits) @ x.T + log_expit(-logits) @ (1 - x).T


def np_log_prior(z, kind):
    if kind == "gaussian":
        return stats.norm.logpdf(z).sum(-1)
    comps = np.stack([stats.norm.logpdf(z, c, np.exp(0.5 * EX_LOG_VAR)).sum(-1) for c in CENTRES])
    return logsumexp(comps, axis=0) - np.log(len(CENTRES))


def np_log_q(z, mean, logvar):
    return stats.norm.logpdf(z, mean, np.exp(0.5 * logvar)).sum(-1)


def np_log_q_fast(z, mean, logvar):
    # the same diagonal normal log-density written out: scipy's per-call overhead on the
    # quadrature grid would dominate the test's run time
    return -0.5 * (np.log(2 * np.pi) + logvar + (z - mean) ** 2 / np.exp(logvar)).sum(-1)


_GRID = {}


def grid(step=0.05, half=9.0):
    if step not in _GRID:
        axis = np.arange(-half, half + step / 2, step)
        g = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
        _GRID[step] = (g, 2 * np.log(step))
    return _GRID[step]


_EXACT = {}


def exact_log_px(kind):
    """[16] log p(x) of every binary image by quadrature, and each posterior's mean and var."""
    if kind not in _EXACT:
        g, log_cell = grid()
        joint = np_log_lik(g, PATTERNS) + np_log_prior(g, kind)[:, None]  # [G, 16]
        log_px = logsumexp(joint, axis=0) + log_cell
        post = np.exp(joint + log_cell - log_px)                         # [G, 16] weights
        mean = post.T @ g
        var = post.T @ g ** 2 - mean ** 2
        _EXACT[kind] = (log_px, mean, var)
    return _EXACT[kind]


def exact_elbo(kind, mean, logvar):
    """[16] E_q[log p(x|z) + log p(z) - log q(z|x)] by quadrature, q = table Gaussians."""
    g, log_cell = grid()
    lik, prior = np_log_lik(g, PATTERNS), np_log_prior(g, kind)
    out = np.empty(16)
    for n in range(16):
        lq = np_log_q_fast(g, mean[n], logvar[n])
        out[n] = np.sum(np.exp(lq + log_cell) * (lik[:, n] + prior - lq))
    return out


def make_model(kind, proposal="good"):
    _, post_mean, post_var = exact_log_px(kind)
    if proposal == "good":   # moment-matched posterior, variance inflated 1.5x (heavier tails)
        mean, logvar = post_mean, np.log(1.5 * post_var)
    elif proposal == "rough":  # the same q for every image
        mean, logvar = np.zeros((16, D)), np.zeros((16, D))
    else:                     # "bad": shifted by 2 and far too narrow
        mean, logvar = post_mean + 2.0, np.full((16, D), -3.0)
    net = TinyNet(mean, logvar)
    prior = GaussianPrior() if kind == "gaussian" else ExemplarPrior(EX_LOG_VAR).double()
    if kind != "gaussian":
        with torch.no_grad():  # the constructor stores lambda in float32; use the exact value
            prior.log_var.fill_(EX_LOG_VAR)
    return VAEWithPrior(net, prior), mean, logvar


def x_all():
    return torch.as_tensor(PATTERNS, dtype=F64)


def centres_for(kind):
    return None if kind == "gaussian" else torch.as_tensor(CENTRES, dtype=F64)


# ---------------------------------------------------------------- importance sampling

def test_quadrature_is_normalised():
    """Sanity of the reference itself: the 16 probabilities sum to 1 for both priors."""
    for kind in ("gaussian", "exemplar"):
        assert np.exp(exact_log_px(kind)[0]).sum() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "exemplar"])
def test_importance_log_likelihood_converges_to_the_exact_log_px(kind):
    """Tolerance 0.02 nats for every image at S=20000; the error shrinks with S."""
    model, _, _ = make_model(kind)
    exact = exact_log_px(kind)[0]
    errors = {}
    for s in (50, 5000, 20000):
        torch.manual_seed(0)
        est = importance_log_likelihood(model, x_all(), n_samples=s, centres=centres_for(kind),
                                        sample_chunk=3000, exemplar_chunk=3)
        errors[s] = np.abs(est.numpy() - exact)
    assert errors[20000].max() < 0.02, errors[20000]
    assert errors[5000].max() < 0.04, errors[5000]
    assert errors[20000].mean() < errors[5000].mean() < errors[50].mean()
    assert errors[20000].mean() < errors[50].mean() / 5


@pytest.mark.parametrize("kind", ["gaussian", "exemplar"])
def test_importance_estimate_with_a_bad_proposal_stays_below_the_exact_value(kind):
    """Jensen: E[log mean w] <= log p(x); a shifted, narrow q underestimates by a lot."""
    model, _, _ = make_model(kind, proposal="bad")
    exact = exact_log_px(kind)[0]
    torch.manual_seed(1)
    est = importance_log_likelihood(model, x_all(), n_samples=5000,
                                    centres=centres_for(kind)).numpy()
    assert np.all(est < exact + 0.02), est - exact
    assert np.mean(exact - est) > 0.1  # the test can tell a bad proposal from a good one


def test_importance_log_likelihood_rejects_non_positive_sample_count():
    model, _, _ = make_model("gaussian")
    with pytest.raises(ValueError, match="n_samples"):
        importance_log_likelihood(model, x_all(), n_samples=0)


# ---------------------------------------------------------------- ELBO

@pytest.mark.parametrize("kind,proposal", [("gaussian", "good"), ("gaussian", "rough"),
                                           ("exemplar", "rough")])
def test_mean_elbo_matches_quadrature_and_is_below_log_px(kind, proposal):
    model, mean, logvar = make_model(kind, proposal)
    reps = 4000
    x = x_all().repeat(reps, 1)  # row r is pattern r % 16
    torch.manual_seed(2)
    with torch.no_grad():
        out = model(x, beta=1.0, centres=centres_for(kind))
    elbo = out.elbo.numpy().reshape(reps, 16)
    mc_mean, se = elbo.mean(0), elbo.std(0) / np.sqrt(reps)
    want = exact_elbo(kind, mean, logvar)
    log_px = exact_log_px(kind)[0]
    assert np.all(want <= log_px + 1e-9)
    assert np.all(np.abs(mc_mean - want) < 5 * se + 1e-9), (mc_mean - want) / se
    assert np.all(mc_mean <= log_px + 5 * se)
    if proposal == "rough":  # a visible gap, so the bound is not vacuous
        assert np.mean(log_px - mc_mean) > 0.1


def test_elbo_terms_match_scipy_for_the_sampled_z():
    model, mean, logvar = make_model("gaussian", "rough")
    with torch.no_grad():
        model.net.table_mean.normal_(generator=torch.Generator().manual_seed(3))
        model.net.table_logvar.uniform_(-1.0, 0.5, generator=torch.Generator().manual_seed(4))
    mean = model.net.table_mean.detach().numpy()
    logvar = model.net.table_logvar.detach().numpy()
    x = x_all()
    torch.manual_seed(5)
    z = model.net.terms(x, 1).z_top[0].detach().numpy()   # the same draw forward() makes
    torch.manual_seed(5)
    beta = 0.3
    out = model(x, beta=beta)
    kl_want = np_log_q(z, mean, logvar) - stats.norm.logpdf(z).sum(-1)
    log_px_want = np.array([np_log_lik(z[n:n + 1], PATTERNS[n:n + 1])[0, 0] for n in range(16)])
    np.testing.assert_allclose(out.kl.detach().numpy(), kl_want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.log_px.detach().numpy(), log_px_want, rtol=1e-10)
    np.testing.assert_allclose(out.elbo.detach().numpy(), log_px_want - beta * kl_want,
                               rtol=1e-10)
    assert out.loss.item() == pytest.approx(-np.mean(log_px_want - beta * kl_want), rel=1e-10)


@pytest.mark.parametrize("epoch,warmup,want", [
    (0, 100, 0.01), (49, 100, 0.5), (98, 100, 0.99), (99, 100, 1.0), (500, 100, 1.0),
    (0, 1, 1.0), (0, 0, 1.0), (3, -5, 1.0), (1, 4, 0.5)])
def test_kl_warmup_schedule(epoch, warmup, want):
    assert kl_beta(epoch, warmup) == pytest.approx(want)


@pytest.mark.parametrize("epoch,epochs,want", [
    # half a cosine from lr (epoch 0) towards 0 after the last epoch: lr (1 + cos(pi e/E)) / 2
    (0, 60, 1e-3), (30, 60, 5e-4), (15, 60, 1e-3 * (2 + 2 ** 0.5) / 4),
    (45, 60, 1e-3 * (2 - 2 ** 0.5) / 4), (59, 60, 1e-3 * (1 - 0.9986295347545738) / 2),
    (60, 60, 0.0), (75, 60, 0.0), (0, 1, 1e-3)])
def test_cosine_learning_rate_schedule(epoch, epochs, want):
    assert learning_rate(epoch, 1e-3, "cosine", epochs) == pytest.approx(want, abs=1e-15)
    assert learning_rate(epoch, 1e-3, "constant", epochs) == 1e-3
    with pytest.raises(ValueError, match="constant, cosine"):
        learning_rate(epoch, 1e-3, "linear", epochs)


# ---------------------------------------------------------------- exact-subsampled path

def test_exemplar_path_prior_is_the_parzen_density_of_re_encoded_exemplars():
    """forward(exemplars=..., exclude=..., log_norm=...) puts the encoder means of the exemplars
    in the prior, honours the mask and normalizer, and sends gradients into their encoding."""
    rng = np.random.default_rng(6)
    model, _, _ = make_model("exemplar", "rough")
    with torch.no_grad():
        model.net.table_mean.copy_(torch.as_tensor(rng.normal(size=(16, D))))
        model.net.table_logvar.copy_(torch.as_tensor(rng.uniform(-1, 0.5, size=(16, D))))
    mean = model.net.table_mean.detach().numpy().copy()
    logvar = model.net.table_logvar.detach().numpy().copy()
    batch_idx, ex_idx = np.arange(0, 8), np.array([8, 9, 11, 12, 14, 3])  # 3 is in the batch
    x = torch.as_tensor(PATTERNS[batch_idx])
    exemplars = torch.as_tensor(PATTERNS[ex_idx])
    exclude = rng.random((8, 6)) < 0.3
    exclude[:, 5] = batch_idx == 3        # leave-one-out of pattern 3 for its own row
    exclude[0] = True
    exclude[0, 2] = False                 # row 0 keeps exactly one exemplar
    log_norm = np.log(rng.integers(5, 50, size=8).astype(np.float64))

    torch.manual_seed(7)
    z = model.net.terms(x, 1).z_top[0].detach().numpy()
    torch.manual_seed(7)
    out = model(x, beta=1.0, exemplars=exemplars, exclude=torch.from_numpy(exclude),
                log_norm=torch.from_numpy(log_norm))
    prior_term = np_log_q(z, mean[batch_idx], logvar[batch_idx]) - out.kl.detach().numpy()

    s = np.exp(0.5 * EX_LOG_VAR)
    want = np.array([
        logsumexp([stats.norm.logpdf(z[b], mean[ex_idx[c]], s).sum()
                   for c in range(6) if not exclude[b, c]]) - log_norm[b] for b in range(8)])
    np.testing.assert_allclose(prior_term, want, rtol=1e-9)
    separately = exemplar_log_prob(torch.as_tensor(z), model.net.encode_top(exemplars)[0],
                                   model.prior.log_var, exclude=torch.from_numpy(exclude),
                                   log_norm=torch.from_numpy(log_norm))
    np.testing.assert_allclose(prior_term, separately.detach().numpy(), rtol=1e-9)

    # gradients reach the exemplars' encoder rows (not in the batch) and lambda ...
    out.loss.backward()
    only_exemplars = [8, 9, 11, 12, 14]
    assert model.net.table_mean.grad[only_exemplars].abs().sum(1).gt(0).all()
    assert model.prior.log_var.grad.abs().item() > 0
    # ... but not with precomputed centres (the validation path); same value there
    model.zero_grad()
    torch.manual_seed(7)
    centres = model.net.encode_top(exemplars)[0].detach()
    out2 = model(x, beta=1.0, centres=centres, exclude=torch.from_numpy(exclude),
                 log_norm=torch.from_numpy(log_norm))
    np.testing.assert_allclose(out2.kl.detach().numpy(), out.kl.detach().numpy(), rtol=1e-12)
    out2.loss.backward()
    assert model.net.table_mean.grad[only_exemplars].abs().sum().item() == 0.0


def test_exemplar_prior_without_centres_is_a_clear_error():
    model, _, _ = make_model("exemplar")
    with pytest.raises(ValueError, match="centres"):
        model(x_all())
