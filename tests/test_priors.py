"""The prior densities against brute force in float64 numpy/scipy.

Every expected value is computed from scipy.stats log-densities and scipy.special.logsumexp,
never from the code under test.
"""

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from exvae_dist.core.priors import (ExemplarPrior, VampPrior, exemplar_log_prob,
                                    mixture_log_prob, streamed_exemplar_log_prob)
from exvae_dist.core import candidates as cand_mod

F64 = torch.float64


def _scipy_parzen(z, centres, log_var, keep=None, log_norm=None):
    """Reference: per row, logsumexp over kept centres of the isotropic normal logpdf - log(norm).

    z [B, d], centres [C, d], keep [B, C] bool (None = all), log_norm [B] (None = log #kept).
    """
    b, d = z.shape
    cov = np.exp(log_var) * np.eye(d)
    out = np.empty(b)
    for i in range(b):
        idx = np.arange(len(centres)) if keep is None else np.nonzero(keep[i])[0]
        comps = np.array([stats.multivariate_normal.logpdf(z[i], mean=centres[c], cov=cov)
                          for c in idx])
        norm = np.log(len(idx)) if log_norm is None else log_norm[i]
        out[i] = (logsumexp(comps) if len(idx) else -np.inf) - norm
    return out


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


# ---------------------------------------------------------------- exemplar_log_prob

@pytest.mark.parametrize("log_var", [-2.0, 0.0, 1.3])
def test_exemplar_log_prob_matches_scipy_without_exclude(log_var):
    rng = np.random.default_rng(0)
    z, centres = rng.normal(size=(7, 3)), rng.normal(size=(11, 3)) * 1.5
    got = exemplar_log_prob(_t(z), _t(centres), torch.tensor(log_var, dtype=F64))
    np.testing.assert_allclose(got.numpy(), _scipy_parzen(z, centres, log_var),
                               rtol=1e-10, atol=1e-10)


def test_exemplar_log_prob_matches_scipy_with_exclude_and_a_single_kept_centre():
    rng = np.random.default_rng(1)
    b, c, d = 9, 13, 4
    z, centres = rng.normal(size=(b, d)), rng.normal(size=(c, d))
    exclude = rng.random((b, c)) < 0.4
    exclude[0] = True
    exclude[0, 5] = False          # row 0 keeps exactly one centre
    exclude[1] = False             # row 1 keeps all
    exclude[2, :] = True
    exclude[2, [0, c - 1]] = False  # the first and last centre only
    log_var = -0.7
    got = exemplar_log_prob(_t(z), _t(centres), torch.tensor(log_var, dtype=F64),
                            exclude=torch.from_numpy(exclude))
    want = _scipy_parzen(z, centres, log_var, keep=~exclude)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    # one kept centre: the mixture is that one Gaussian, normalizer 1
    single = stats.multivariate_normal.logpdf(z[0], centres[5], np.exp(log_var) * np.eye(d))
    assert got[0].item() == pytest.approx(single, rel=1e-12)


class _Blocks:
    """priors.CentreBlocks over an in-memory array, `rows` centres per block."""

    def __init__(self, centres, rows):
        self.centres, self.rows = _t(centres), rows
        self.shape, self.device = tuple(self.centres.shape), torch.device("cpu")
        self.reads = 0

    def blocks(self):
        for start in range(0, self.shape[0], self.rows):
            self.reads += 1
            yield self.centres[start:start + self.rows]

    def __getitem__(self, ids):
        return self.centres[ids]


@pytest.mark.parametrize("rows", [1, 4, 11, 50])
def test_streamed_centres_match_scipy_over_all_centres(rows):
    """Centres read block by block (validation over N too many to hold) give the full
    Parzen density with normalizer N, whatever the block size."""
    rng = np.random.default_rng(3)
    z, centres = rng.normal(size=(6, 3)), rng.normal(size=(11, 3)) * 2.0
    blocks = _Blocks(centres, rows)
    got = streamed_exemplar_log_prob(_t(z), blocks, torch.tensor(-0.75, dtype=F64), chunk=3)
    np.testing.assert_allclose(got.numpy(), _scipy_parzen(z, centres, -0.75), rtol=1e-10,
                               atol=1e-10)
    assert blocks.reads == -(-11 // rows)
    prior = ExemplarPrior(-0.75).double()  # exact in float32
    np.testing.assert_allclose(prior.log_prob(_t(z), centres=blocks).detach().numpy(),
                               got.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="CentreBlocks"):
        prior.log_prob(_t(z), centres=blocks, exclude=torch.zeros(6, 11, dtype=torch.bool))


@pytest.mark.parametrize("chunk", [1, 3, 4, 10])
def test_chunked_equals_unchunked_when_c_is_not_a_multiple_of_chunk(chunk):
    rng = np.random.default_rng(2)
    z, centres = rng.normal(size=(6, 3)), rng.normal(size=(23, 3))
    exclude = torch.from_numpy(rng.random((6, 23)) < 0.5)
    exclude[0, :] = True
    exclude[0, 22] = False  # the only kept centre is in the last, partial chunk
    exclude[1, :4] = True   # a whole chunk excluded for small chunk sizes
    lv = torch.tensor(0.4, dtype=F64)
    full = exemplar_log_prob(_t(z), _t(centres), lv, exclude=exclude, chunk=10_000)
    chunked = exemplar_log_prob(_t(z), _t(centres), lv, exclude=exclude, chunk=chunk)
    np.testing.assert_allclose(chunked.numpy(), full.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(full.numpy(),
                               _scipy_parzen(z, centres, 0.4, keep=~exclude.numpy()),
                               rtol=1e-10)


def test_far_away_centres_stay_finite_and_exact():
    """At distance ~1e3 with log_var=-4, exp(log N) underflows to 0; the log-space sum must not."""
    rng = np.random.default_rng(3)
    d = 2
    z = rng.normal(size=(4, d))
    direction = rng.normal(size=(5, d))
    centres = 1e3 * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    centres += rng.normal(size=(5, d))
    log_var = -4.0
    with np.errstate(divide="ignore"):
        naive = np.log(np.mean(np.exp(
            stats.multivariate_normal.logpdf(z[0], centres[0], np.exp(log_var) * np.eye(d)))))
    assert naive == -np.inf  # so the test really exercises underflow
    got = exemplar_log_prob(_t(z), _t(centres), torch.tensor(log_var, dtype=F64), chunk=2)
    assert torch.isfinite(got).all()
    want = _scipy_parzen(z, centres, log_var)
    assert np.all(want < -1e7)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)


def test_log_norm_override_subtracts_exactly_that_value():
    rng = np.random.default_rng(4)
    z, centres = rng.normal(size=(5, 3)), rng.normal(size=(8, 3))
    exclude = rng.random((5, 8)) < 0.3
    exclude[:, 0] = False
    log_norm = rng.uniform(0.0, 9.0, size=5)
    lv = torch.tensor(-0.3, dtype=F64)
    got = exemplar_log_prob(_t(z), _t(centres), lv, exclude=torch.from_numpy(exclude),
                            log_norm=_t(log_norm))
    want = _scipy_parzen(z, centres, -0.3, keep=~exclude, log_norm=log_norm)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    # and a scalar normalizer is subtracted from every row
    plain = _scipy_parzen(z, centres, -0.3, keep=~exclude, log_norm=np.zeros(5))
    got_scalar = exemplar_log_prob(_t(z), _t(centres), lv, exclude=torch.from_numpy(exclude),
                                   log_norm=torch.tensor(2.5, dtype=F64))
    np.testing.assert_allclose(got_scalar.numpy(), plain - 2.5, rtol=1e-10)


def test_row_with_no_kept_centre_is_minus_inf_and_empty_centres_too():
    z = torch.zeros(2, 2, dtype=F64)
    centres = torch.ones(3, 2, dtype=F64)
    exclude = torch.tensor([[True, True, True], [False, True, True]])
    got = exemplar_log_prob(z, centres, torch.tensor(0.0, dtype=F64), exclude=exclude, chunk=2)
    assert got[0].item() == -np.inf and np.isfinite(got[1].item())
    empty = exemplar_log_prob(z, centres[:0], torch.tensor(0.0, dtype=F64))
    assert torch.equal(empty, torch.full((2,), -np.inf, dtype=F64))


@pytest.mark.parametrize("z_shape,c_shape,ex_shape,ln_shape", [
    ((4,), (5, 3), None, None),            # z not 2-D
    ((4, 3), (5, 2), None, None),          # d mismatch
    ((4, 3), (5, 3, 1), None, None),       # centres not 2-D
    ((4, 3), (5, 3), (5, 4), None),        # exclude transposed
    ((4, 3), (5, 3), (4,), None),          # exclude 1-D
    ((4, 3), (5, 3), None, (4, 1)),        # log_norm would broadcast to [B, B]
    ((4, 3), (5, 3), None, (3,)),          # log_norm of the wrong length
])
def test_wrong_shapes_raise_value_error(z_shape, c_shape, ex_shape, ln_shape):
    kw = {}
    if ex_shape is not None:
        kw["exclude"] = torch.zeros(ex_shape, dtype=torch.bool)
    if ln_shape is not None:
        kw["log_norm"] = torch.zeros(ln_shape, dtype=F64)
    with pytest.raises(ValueError):
        exemplar_log_prob(torch.zeros(z_shape, dtype=F64), torch.zeros(c_shape, dtype=F64),
                          torch.tensor(0.0, dtype=F64), **kw)


def test_bad_chunk_raises_value_error():
    with pytest.raises(ValueError, match="chunk"):
        exemplar_log_prob(torch.zeros(2, 2), torch.zeros(3, 2), torch.tensor(0.0), chunk=0)


@pytest.mark.parametrize("chunk", [2, 100])
def test_exemplar_log_prob_gradcheck_with_exclude(chunk):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 3, dtype=F64, generator=g, requires_grad=True)
    centres = torch.randn(5, 3, dtype=F64, generator=g, requires_grad=True)
    log_var = torch.tensor(-0.2, dtype=F64, requires_grad=True)
    exclude = torch.rand(4, 5, generator=g) < 0.35
    exclude[0] = True
    exclude[0, 3] = False  # one kept centre
    exclude[1] = False
    log_norm = torch.rand(4, dtype=F64, generator=g)
    assert torch.autograd.gradcheck(
        lambda a, b, c: exemplar_log_prob(a, b, c, exclude=exclude, log_norm=log_norm,
                                          chunk=chunk),
        (z, centres, log_var), eps=1e-6, atol=1e-7)


def test_gradient_of_log_var_matches_finite_difference_of_scipy():
    """Not only self-consistent: the lambda gradient matches a central difference of scipy."""
    rng = np.random.default_rng(6)
    z, centres = rng.normal(size=(3, 2)), rng.normal(size=(6, 2))
    lv = torch.tensor(0.25, dtype=F64, requires_grad=True)
    exemplar_log_prob(_t(z), _t(centres), lv).sum().backward()
    h = 1e-5
    fd = (_scipy_parzen(z, centres, 0.25 + h).sum()
          - _scipy_parzen(z, centres, 0.25 - h).sum()) / (2 * h)
    assert lv.grad.item() == pytest.approx(fd, rel=1e-6)


# ---------------------------------------------------------------- RAT lower bound

def _rat_setup(seed, log_var, n=300, d=3, b=24, k=10, m=150, noise=0.3):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, d))                   # cached exemplar means
    batch_ids = rng.choice(n, size=b, replace=False)
    queries = mu[batch_ids]
    z = queries + noise * rng.normal(size=queries.shape)  # where the prior is evaluated
    coins = cand_mod.draw_coins(n, m, rng)
    # exact ranking over ALL N by brute force (self comes first at distance 0)
    dist = ((queries[:, None, :] - mu[None, :, :]) ** 2).sum(-1)
    depth = cand_mod.query_depth(k, n, m)
    ranking = np.argsort(dist, axis=1, kind="stable")[:, :depth]
    cand = cand_mod.assemble_candidates(ranking, batch_ids, coins, k)
    rat = exemplar_log_prob(_t(z), _t(mu[cand.ids]), torch.tensor(log_var, dtype=F64),
                            exclude=torch.from_numpy(cand.exclude),
                            log_norm=torch.from_numpy(cand.log_norm)).numpy()
    # the exact subsampled prior: every coin winner except self, normalizer |S minus {i}|
    keep = np.broadcast_to(coins, (b, n)).copy()
    keep[np.arange(b), batch_ids] = False
    exact = _scipy_parzen(z, mu, log_var, keep=keep)
    return rat, exact, coins, batch_ids, cand


def _roundoff(exact):
    # float64 round-off of a log-density of magnitude |exact| (values reach ~ -7000 here)
    return 1e-12 * np.maximum(1.0, np.abs(exact))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("log_var", [-1.0, 0.5])
def test_rat_log_prior_is_a_lower_bound_of_the_subsampled_prior(seed, log_var):
    rat, exact, coins, batch_ids, cand = _rat_setup(seed, log_var)
    # both coin outcomes for batch members occur, so both normalizer cases are exercised
    assert coins[batch_ids].any() and (~coins[batch_ids]).any()
    assert cand.n_short == 0
    assert np.all(rat <= exact + _roundoff(exact)), (rat - exact).max()
    assert (exact - rat).max() > 1e-2  # with a broad kernel the far components matter


def test_rat_log_prior_is_close_when_the_kernel_is_narrow():
    """log_var=-9 (s ~ 0.011) and z at the query: the k nearest carry all but ~e^-40 of the mass.

    Tolerance 1e-9 nats (round-off on values up to ~7000 nats is ~1e-12): the dropped
    components are each ~(d_11^2 - d_1^2)/(2 s^2) nats below the nearest one.
    """
    rat, exact, *_ = _rat_setup(7, -9.0, noise=0.0)
    assert np.all(rat <= exact + _roundoff(exact))
    np.testing.assert_allclose(rat, exact, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- VampPrior

def test_mixture_log_prob_matches_scipy_mixture_of_diagonal_gaussians():
    rng = np.random.default_rng(8)
    z = rng.normal(size=(6, 3)) * 2
    means, logvars = rng.normal(size=(5, 3)), rng.uniform(-3, 1.5, size=(5, 3))
    want = np.array([
        logsumexp([stats.norm.logpdf(zi, m, np.exp(0.5 * lv)).sum()
                   for m, lv in zip(means, logvars)]) - np.log(5) for zi in z])
    got = mixture_log_prob(_t(z), _t(means), _t(logvars))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_mixture_log_prob_in_float32_keeps_float32_accuracy_and_exact_gradients():
    """The [B, d] x [d, K] expansion cancels where variances are small and z sits near a
    mean; float32 inputs (a trained VampPrior's logvars reach -6) must still match scipy."""
    rng = np.random.default_rng(10)
    means = rng.normal(size=(50, 40)) * 2
    logvars = rng.uniform(-6.5, 0.5, size=(50, 40))
    near = means[rng.integers(0, 50, 8)] + 0.05 * rng.normal(size=(8, 40))
    z = np.concatenate([near, rng.normal(size=(8, 40)) * 2])
    z32, m32, lv32 = (x.astype(np.float32) for x in (z, means, logvars))
    want = np.array([
        logsumexp([stats.norm.logpdf(zi, m, np.exp(0.5 * lv)).sum()
                   for m, lv in zip(m32.astype(float), lv32.astype(float))]) - np.log(50)
        for zi in z32.astype(float)])
    got = mixture_log_prob(torch.from_numpy(z32), torch.from_numpy(m32), torch.from_numpy(lv32))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-7, atol=0)
    # gradients against finite differences (float64)
    args = [_t(z[:3, :4]).requires_grad_(), _t(means[:5, :4]).requires_grad_(),
            _t(logvars[:5, :4] / 4).requires_grad_()]
    assert torch.autograd.gradcheck(mixture_log_prob, args)


def test_vampprior_uses_the_posterior_at_clipped_pseudo_inputs():
    torch.manual_seed(0)
    prior = VampPrior(n_pseudo=4, x_dim=3).double()
    with torch.no_grad():
        prior.pseudo_raw.copy_(torch.tensor([[-0.5, 0.2, 1.7], [0.3, 0.3, 0.3],
                                             [1.0, 0.0, 0.5], [0.9, 2.0, -1.0]], dtype=F64))
    a = np.array([[1.0, -0.5], [0.3, 2.0], [-1.2, 0.4]])
    b = np.array([[0.2, -0.1], [0.5, 0.0], [-0.3, 0.6]])

    def encode_top(x):
        return x @ _t(a), x @ _t(b) - 0.5

    z = np.random.default_rng(9).normal(size=(5, 2))
    pseudo = np.clip(prior.pseudo_raw.detach().numpy(), 0.0, 1.0)
    means, logvars = pseudo @ a, pseudo @ b - 0.5
    want = np.array([
        logsumexp([stats.norm.logpdf(zi, m, np.exp(0.5 * lv)).sum()
                   for m, lv in zip(means, logvars)]) - np.log(4) for zi in z])
    got = prior.log_prob(_t(z), encode_top=encode_top)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10)
