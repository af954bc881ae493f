"""Importance-sampled test log-likelihood with the exemplar prior over ALL N exemplars.

    log p(x) ~= logmeanexp_s [log p(x|z_s) + log p(z_s | X) - log q(z_s | x)],  z_s ~ q(z|x)
    log p(z | X) = logsumexp_n [-|z - mu_n|^2 / (2 s^2)] - log N - d/2 log(2 pi s^2)

Pure torch. The cost of the naive estimate is S x N squared distances per image (2.5e8 at
S = 5000, N = 50,000). All S samples of one image lie near its posterior mean mu, so most
exemplars are provably irrelevant: with rho_s = |z_s - mu| and r the distance from mu to the
nearest exemplar OUTSIDE a pool of the P exemplars nearest to mu, every outside exemplar is
at least (r - rho_s) from z_s (triangle inequality). Hence per sample

    exact (all N):  the outside mass is at most sum_n exp(-(r_n - rho_s)+^2 / (2 s^2)), r_n the
                    distance of exemplar n from mu (bounded in bins of equal length); each
                    sample's pool grows until that bound adds at most `tol` nats to ITS
                    log p(z_s) (samples near mu stop early), so the result is the exact-prior
                    estimate to within `tol` (reported as max_error);
    k nearest:      the pool's k nearest to z_s are the true k nearest whenever the k-th pool
                    distance is <= r - rho_s; the pool grows until that holds for every sample,
                    so the result is exactly "the k nearest exemplars of each sample,
                    normalized by N", a LOWER BOUND on the exact-prior estimate.

Both are computed with the same posterior samples as `objective.importance_log_likelihood`
(same encode / terms calls in the same order), so under one seed they agree with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..core.models.layers import LOG_2PI
from ..core.objective import VAEWithPrior, importance_log_likelihood
from ..core.priors import DEFAULT_CHUNK, exp_floor, squared_distances


@dataclass
class LikelihoodResult:
    """log_px: [B] estimates in nats. max_error: the largest certified gap (nats) between an
    exact-prior value and the computed one (0 for the k-nearest mode and non-exemplar priors).
    pools: per image, the median over its samples of the exemplars each was computed against
    (exemplar prior only)."""

    log_px: torch.Tensor
    max_error: float = 0.0
    pools: list = field(default_factory=list)


def sorted_exemplars(mu: torch.Tensor, centres: torch.Tensor,
                     c_sq: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mu: [B, d], centres: [N, d] -> (order [B, N] exemplar ids nearest first, d2 [B, N] the
    squared distances in that order)."""
    d2 = squared_distances(mu, centres)
    d2, order = torch.sort(d2, dim=1)
    return order, d2


def _outside_radius(d2_sorted: torch.Tensor, pool: int, slack: float) -> float:
    """Distance from mu below which no exemplar outside the first `pool` can lie; `slack`
    absorbs the float32 round-off of the expanded squared distances."""
    if pool >= d2_sorted.shape[0]:
        return math.inf
    return math.sqrt(max(0.0, d2_sorted[pool].item() - slack))


def _outside_bins(d2_sorted: torch.Tensor, size: int, slack: float, rho: torch.Tensor,
                  inv_var: torch.Tensor, bins: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper bounds on the log of the mixture mass of bins of exemplars outside the pool.

    The exemplars ranked size.. are cut into at most `bins` bins of equal length; every
    exemplar of a bin is at least r_b (the distance of the bin's first exemplar) from mu, so at
    least (r_b - rho_s)+ from sample s. log_bins[s, t] bounds the log of bin t's mass for s.
    Returns (bin start ranks [T], log_bins [S, T]).
    """
    n = d2_sorted.shape[0]
    length = max(16, -(-(n - size) // bins))
    starts_t = torch.arange(size, n, length, device=d2_sorted.device)
    counts = torch.diff(torch.cat([starts_t, starts_t.new_tensor([n])])).to(rho.dtype)
    radius = torch.sqrt((d2_sorted[starts_t] - slack).clamp_min(0.0))  # [T]
    gap = (radius[None, :] - rho[:, None]).clamp_min(0.0)  # [S, T]
    return starts_t, torch.log(counts)[None, :] - 0.5 * gap.pow(2) * inv_var


def _next_size_guess(starts: torch.Tensor, log_bins: torch.Tensor, lse: torch.Tensor,
                     tol: float, n: int) -> torch.Tensor:
    """Per sample, the first bin start from which the outside mass would pass `tol`: [S].
    Only a guess of the pool to compute next (the next round certifies it): the reverse
    cumulative sums run in float64 exp space, 3x cheaper than torch.logcumsumexp, and a tail
    that underflows there merely stops a pool short by a round."""
    lb = log_bins.double()
    top = lb.amax(1, keepdim=True)
    tails = torch.cumsum(torch.exp(lb - top).flip(1), 1).flip(1).log() + top
    ok = tails - lse.double()[:, None] <= math.log(math.expm1(tol))  # softplus(x) <= tol
    return torch.where(ok.any(1), starts[ok.to(torch.uint8).argmax(1)], n)


# `tol` of the exact mode: 1e-6 nats, far below the 0.01 nats results are quoted at; a
# tighter bound costs little (the pool grows until it holds), a looser one buys nothing
PRIOR_TOLERANCE = 1e-6
# the shift of each sample is its largest logit among this many pool exemplars (the nearest
# to the posterior mean); exps of the rest stay below overflow unless one of them beats it by
# ~88 nats (float32), which `_exact_pooled` detects and redoes with the exact maximum
SHIFT_FROM = 64
# after an image's first sample chunk, the next ones start from this quantile of its
# samples' pools: fewer rounds for most samples, a little extra for the nearest tenth
START_QUANTILE = 0.1


def _augment_samples(z: torch.Tensor, inv_var: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """[S, d] -> [S, d + 2], so that one matmul with `ranked_centres`' rows gives
    -|z - c|^2 / (2 s^2) - shift: the bias terms ride in the GEMM instead of extra passes."""
    half_sq = (0.5 * inv_var) * (z * z).sum(1)
    return torch.cat([z * inv_var, z.new_ones(z.shape[0], 1), (-(shift + half_sq))[:, None]], 1)


def ranked_centres(centres: torch.Tensor, order: torch.Tensor,
                   log_var: torch.Tensor) -> torch.Tensor:
    """The centres in one image's order (nearest to its posterior mean first), each row
    [c, -|c|^2 / (2 s^2), 1]: [N, d + 2]. Gathered once per image, not per sample chunk."""
    inv_var = torch.exp(-torch.as_tensor(log_var, dtype=centres.dtype, device=centres.device))
    c = centres[order]
    half_sq = (0.5 * inv_var) * (c * c).sum(1)
    return torch.cat([c, (-half_sq)[:, None], c.new_ones(c.shape[0], 1)], 1)


def _max_logits(z: torch.Tensor, ranked: torch.Tensor, inv_var: torch.Tensor,
                chunk: int) -> torch.Tensor:
    """max_c -|z - c|^2 / (2 s^2) over the rows of `ranked`: [S]."""
    za = _augment_samples(z, inv_var, z.new_zeros(z.shape[0]))
    return torch.stack([(za @ ranked[i:i + chunk].t()).amax(1)
                        for i in range(0, ranked.shape[0], chunk)]).amax(0)


def _exp_sums(z: torch.Tensor, shift: torch.Tensor, ranked: torch.Tensor,
              inv_var: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum_c exp(-|z - c|^2 / (2 s^2) - shift) over the rows of `ranked`, in blocks: [S].
    Four passes per block (matmul, clamp, exp, sum). Arguments below priors.exp_floor count
    as exp(floor) (CPU exp is slow far below zero); that adds at most N exp(floor) relative
    to the sum, which is >= 1 since the shift is one of its own terms."""
    floor = exp_floor(z.dtype)
    za = _augment_samples(z, inv_var, shift)
    total = z.new_zeros(z.shape[0])
    for start in range(0, ranked.shape[0], chunk):
        total += (za @ ranked[start:start + chunk].t()).clamp_min_(floor).exp_().sum(1)
    return total


def _exact_pooled(z: torch.Tensor, mu: torch.Tensor, ranked: torch.Tensor,
                  inv_var: torch.Tensor, d2_sorted: torch.Tensor, pool: int, tol: float,
                  chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact mode, certified per sample: every sample starts with the `pool` exemplars nearest
    to mu; those whose outside mass is not yet certified below `tol` get the next exemplars,
    the others stop. A sample's pool is what ITS distance from mu needs: on a trained MNIST
    model the mean per-sample pool was ~4x smaller than the largest one, which a pool shared
    by all samples of an image has to take.

    Returns (logsumexp over all N up to tol [S], per-sample pool sizes [S], errors [S])."""
    n = ranked.shape[0]
    n_samples = z.shape[0]
    rho = (z - mu[None, :]).norm(dim=1)
    # round-off of |mu|^2 - 2 mu.c + |c|^2 in float32, with a wide margin
    slack = 1e-4 * (1.0 + mu.pow(2).sum().item() + d2_sorted[-1].item())
    shift = _max_logits(z, ranked[:SHIFT_FROM], inv_var, chunk)
    sums = z.new_zeros(n_samples)
    sizes = torch.zeros(n_samples, dtype=torch.long, device=z.device)
    errors = z.new_zeros(n_samples)
    active = torch.arange(n_samples, device=z.device)
    done, size = 0, (n if pool <= 0 else min(n, pool))
    while True:
        za, za_shift = z[active], shift[active]
        za_sums = sums[active] + _exp_sums(za, za_shift, ranked[done:size], inv_var, chunk)
        bad = ~torch.isfinite(za_sums)
        if bool(bad.any()):  # a sample beat its shift by more than exp can hold: redo it
            za_shift[bad] = _max_logits(za[bad], ranked[:size], inv_var, chunk)
            za_sums[bad] = _exp_sums(za[bad], za_shift[bad], ranked[:size], inv_var, chunk)
            shift[active] = za_shift
        sums[active] = za_sums
        sizes[active] = size
        if size >= n:
            return sums.log() + shift, sizes, errors
        lse = za_sums.log() + za_shift
        starts, log_bins = _outside_bins(d2_sorted, size, slack, rho[active], inv_var)
        # the certificate: the mass of every bin outside the pool, relative to the pool's sum
        excess = torch.nn.functional.softplus(torch.logsumexp(log_bins, 1) - lse)
        passed = excess <= tol
        errors[active[passed]] = excess[passed]
        if bool(passed.all()):
            return sums.log() + shift, sizes, errors
        failing = ~passed
        guess = _next_size_guess(starts, log_bins[failing], lse[failing], tol, n)
        active = active[failing]
        # grow to the median guess (at least 1.5x): a sample computes about what it needs,
        # in a few rounds
        done, size = size, min(n, max(size + size // 2, int(guess.median().item())))


def _nearest_pool_logits(z: torch.Tensor, pool_centres: torch.Tensor, inv_var: torch.Tensor,
                         k: int, chunk: int) -> torch.Tensor:
    """z: [S, d], pool_centres: [P, d] -> the k largest logits [S, k] sorted descending, in
    blocks of `chunk` centres (running merge)."""
    best = None
    for start in range(0, pool_centres.shape[0], chunk):
        logits = squared_distances(z, pool_centres[start:start + chunk]).mul_(-0.5 * inv_var)
        part = torch.topk(logits, min(k, logits.shape[1]), dim=1).values
        best = part if best is None else torch.topk(torch.cat([best, part], 1),
                                                    min(k, best.shape[1] + part.shape[1]),
                                                    dim=1).values
    return best


def pooled_exemplar_log_prior(z: torch.Tensor, mu: torch.Tensor, centres: torch.Tensor,
                              log_var: torch.Tensor, order: torch.Tensor, d2_sorted: torch.Tensor,
                              neighbours: Optional[int] = None, pool: int = 1024,
                              tol: float = PRIOR_TOLERANCE, chunk: int = DEFAULT_CHUNK,
                              ranked: Optional[torch.Tensor] = None
                              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """log p(z_s | X) of the samples of ONE image (module docstring).

    z: [S, d] samples; mu: [d] their posterior mean; centres: [N, d]; order, d2_sorted: [N]
    from `sorted_exemplars` for this mu; neighbours: None = exact prior over all N, k = the k
    nearest exemplars of each sample (lower bound); pool: initial pool size (0 = all N);
    ranked: `ranked_centres(centres, order, log_var)` when the caller keeps it across calls.
    Returns (log_p [S], the pool size each sample used [S], certified max error in nats of
    the exact mode).
    """
    n, d = centres.shape
    log_var = torch.as_tensor(log_var, dtype=z.dtype, device=z.device).reshape(())
    inv_var = torch.exp(-log_var)
    const = -math.log(n) - 0.5 * d * (LOG_2PI + log_var.item())
    if neighbours is None:
        if ranked is None:
            ranked = ranked_centres(centres, order, log_var)
        lse, sizes, errors = _exact_pooled(z, mu, ranked, inv_var, d2_sorted, pool, tol, chunk)
        return lse + const, sizes, errors.max().item()
    k = min(int(neighbours), n)
    rho = (z - mu[None, :]).norm(dim=1)  # [S]
    # round-off of |mu|^2 - 2 mu.c + |c|^2 in float32, with a wide margin
    slack = 1e-4 * (1.0 + mu.pow(2).sum().item() + d2_sorted[-1].item())
    size = n if pool <= 0 else min(n, max(pool, k))
    while True:
        radius = _outside_radius(d2_sorted, size, slack)
        best = _nearest_pool_logits(z, centres[order[:size]], inv_var, k, chunk)
        gap = (radius - rho).clamp_min(0.0)
        # k-th nearest pool distance vs the distance every outside exemplar keeps
        kth = torch.sqrt((-2.0 * best[:, -1] / inv_var).clamp_min(0.0))
        if size >= n or bool((kth <= gap).all()):
            sizes = torch.full((z.shape[0],), size, dtype=torch.long, device=z.device)
            return torch.logsumexp(best, dim=1) + const, sizes, 0.0
        needed = rho + kth  # the pool's k-th distance can only shrink as it grows
        # jump straight to the pool that holds every exemplar within the needed radius
        # (at least doubling, so a near miss does not cost many rounds)
        reach = torch.searchsorted(d2_sorted, needed.max().pow(2) + slack).item() + 1
        size = min(n, max(2 * size, reach))


@torch.no_grad()
def estimate_log_likelihood(model: VAEWithPrior, x: torch.Tensor, n_samples: int = 5000,
                        centres: Optional[torch.Tensor] = None, neighbours: Optional[int] = None,
                        pool: int = 1024, tol: float = PRIOR_TOLERANCE, sample_chunk: int = 500,
                        exemplar_chunk: int = DEFAULT_CHUNK) -> LikelihoodResult:
    """Importance-sampled log p(x) of a batch x: [B, D] (binary test images).

    Exemplar prior: centres [N, d] = encoder means of ALL training exemplars (no leave-one-out,
    normalizer N); `neighbours` = k switches to the k-nearest truncated prior (a LOWER BOUND);
    `pool`, `tol`: module docstring. Other priors: objective.importance_log_likelihood.
    Samples are drawn exactly as objective.importance_log_likelihood draws them.
    """
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if model.prior_kind != "exemplar":
        return LikelihoodResult(importance_log_likelihood(model, x, n_samples, centres,
                                                          sample_chunk, exemplar_chunk))
    if centres is None:
        raise ValueError("the exemplar prior needs centres: the encoder means of all N "
                         "training exemplars (objective.encode_means)")
    if neighbours is not None and neighbours < 1:
        raise ValueError(f"neighbours must be a positive number of exemplars, got {neighbours}")
    mu = model.net.encode_top(x)[0]
    order, d2_sorted = sorted_exemplars(mu, centres)
    start = [pool] * x.shape[0]
    sizes = [[] for _ in range(x.shape[0])]
    ranked = ([None] * x.shape[0] if neighbours is not None else
              [ranked_centres(centres, order[b], model.prior.log_var) for b in range(x.shape[0])])
    max_error = 0.0

    def pooled(z_top: torch.Tensor) -> torch.Tensor:  # [s, B, d] -> [s, B]
        nonlocal max_error
        log_p = z_top.new_empty(z_top.shape[:2])
        for b in range(x.shape[0]):
            log_p[:, b], used, err = pooled_exemplar_log_prior(
                z_top[:, b], mu[b], centres, model.prior.log_var, order[b], d2_sorted[b],
                neighbours, start[b], tol, exemplar_chunk, ranked[b])
            sizes[b].append(used)
            # the next chunk of this image starts where most of this one's samples got to
            # (the truncated mode: where all did), saving the rounds below it
            start[b] = int(used.max().item() if neighbours is not None else
                           max(pool, torch.quantile(used.double(), START_QUANTILE).item()))
            max_error = max(max_error, err)
        return log_p

    log_px = importance_log_likelihood(model, x, n_samples, sample_chunk=sample_chunk,
                                       log_prior=pooled)
    pools = [int(torch.cat(per).median().item()) for per in sizes]
    return LikelihoodResult(log_px, max_error, pools)


def describe_prior(prior_kind: str, n_exemplars: int, neighbours: Optional[int], tol: float,
                   pool: int) -> str:
    """The label every output carries: which prior the log-likelihood was computed with."""
    if prior_kind != "exemplar":
        return f"{prior_kind} prior (exact density)"
    if neighbours is None or neighbours >= n_exemplars:
        how = ("every sample against all exemplars" if pool <= 0 else
               f"exemplars outside each sample's pool skipped only when their total mass is "
               f"certified below {tol:g} nats")
        return f"exact exemplar prior over all N={n_exemplars} exemplars, normalizer N ({how})"
    return (f"LOWER BOUND: nearest-neighbour-truncated exemplar prior, the k={neighbours} "
            f"nearest of N={n_exemplars} exemplars per sample, normalizer N")


def chunk_sizes(device: torch.device) -> tuple[int, int]:
    """(samples, exemplars) per block of the estimate: the sizes measured fastest on each
    device (a 2-core CPU: blocks that stay in cache; an H100: a whole image's 5000 samples
    against 16,384 exemplars per kernel, 10x the images per second of the CPU sizes there)."""
    gpu = device.type != "cpu"
    return (5000 if gpu else 500), (16384 if gpu else DEFAULT_CHUNK)
