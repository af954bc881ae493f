"""Pixel likelihoods p(x | z): Bernoulli for binary pixels, a discretized logistic mixture for
8-bit levels (grey or colour).

A decoder emits `params_per_dim * D` numbers per image, laid out parameter-major
([..., P, D] flattened), and the likelihood turns them into log p(x|z) (nats, summed over
the D sub-pixels), pixel means for pictures, and samples. Pure torch.

Discretized logistic mixture (Salimans et al. 2017, PixelCNN++, without the channel
coupling: every sub-pixel has its own K-component mixture given z). A level k in 0..255 is
y = 2k/255 - 1 in [-1, 1]; its bin is [y - 1/255, y + 1/255], the two end bins open to
-inf / +inf, so the 256 probabilities of a sub-pixel sum to 1 exactly:

    P(k) = sum_j pi_j [F((y + 1/255 - m_j) / s_j) - F((y - 1/255 - m_j) / s_j)],  F = sigmoid

The difference of two sigmoids is computed in log space on the side of the logistic where
both are small (reflecting through 0), so far tails neither cancel nor underflow; no
approximation by the density at the bin centre is used.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.nn import functional as F

from .layers import bernoulli_log_prob

LEVELS = 256
HALF_BIN = 1.0 / 255.0  # half the bin width on the [-1, 1] scale
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 5.0


class BernoulliLikelihood:
    """One logit per pixel; x in {0, 1} (grey levels act as soft targets)."""

    kind = "bernoulli"
    params_per_dim = 1

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """params: [..., B, D] logits, x: [B, D] -> [..., B] nats."""
        return bernoulli_log_prob(params, x)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def sample(self, params: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(params), generator=generator)


def log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    d = d.clamp_max(-1e-30)
    return torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def log_sigmoid_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(a) - sigmoid(b)) for a > b, elementwise, stable in both tails.

    sigmoid(a) - sigmoid(b) = sigmoid(-b) - sigmoid(-a): evaluate it where both arguments
    lie left of 0, where log sigmoid(t) ~ t carries full precision.
    """
    flip = (a + b) > 0
    hi = torch.where(flip, -b, a)
    lo = torch.where(flip, -a, b)
    log_hi = F.logsigmoid(hi)
    return log_hi + log1mexp(F.logsigmoid(lo) - log_hi)


class DiscretizedLogisticMixture:
    """K logistic components per sub-pixel: P = 3K parameters (mixture logits, means on the
    [-1, 1] scale, log-scales); x holds 8-bit levels k/255 in [0, 1]."""

    kind = "dlogistic"

    def __init__(self, n_mixtures: int = 5):
        if n_mixtures < 1:
            raise ValueError(f"model.n_mixtures must be at least 1, got {n_mixtures}")
        self.k = int(n_mixtures)
        self.params_per_dim = 3 * self.k

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., 3K * D] -> mixture log-weights, means, log-scales, each [..., K, D]."""
        p = params.reshape(params.shape[:-1] + (3, self.k, -1))
        log_pi = torch.log_softmax(p[..., 0, :, :], dim=-2)
        log_s = p[..., 2, :, :].clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
        return log_pi, p[..., 1, :, :], log_s

    def component_log_prob(self, means: torch.Tensor, log_scales: torch.Tensor,
                           x: torch.Tensor) -> torch.Tensor:
        """log P(level of x | component): means, log_scales [..., K, D], x broadcastable to
        [..., 1, D] with levels k/255 -> [..., K, D]."""
        level = torch.round(x * 255.0)
        y = level * (2.0 / 255.0) - 1.0
        inv_s = torch.exp(-log_scales)
        upper = (y + HALF_BIN - means) * inv_s
        lower = (y - HALF_BIN - means) * inv_s
        middle = log_sigmoid_difference(upper, lower)
        first = F.logsigmoid(upper)  # level 0: the bin reaches down to -inf
        last = F.logsigmoid(-lower)  # level 255: up to +inf
        return torch.where(level <= 0, first, torch.where(level >= 255, last, middle))

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """params: [..., B, 3K * D], x: [B, D] levels k/255 -> log p(x|z) [..., B] in nats."""
        log_pi, means, log_s = self.split(params)
        comp = self.component_log_prob(means, log_s, x.unsqueeze(-2))
        return torch.logsumexp(log_pi + comp, dim=-2).sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Pixel means in [0, 1] for pictures: sum_j pi_j clamp((m_j + 1) / 2) (each logistic's
        mean, clipped to the pixel range; the exact discretized mean differs near the ends)."""
        log_pi, means, _ = self.split(params)
        return (log_pi.exp() * ((means + 1.0) / 2.0).clamp(0.0, 1.0)).sum(-2)

    def sample(self, params: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One level per sub-pixel, as k/255 in [0, 1]: [..., 3K * D] -> [..., D]."""
        log_pi, means, log_s = self.split(params)
        flat_pi = log_pi.movedim(-2, -1).reshape(-1, self.k).exp()
        pick = torch.multinomial(flat_pi.cpu(), 1, generator=generator).to(params.device)
        pick = pick.reshape(log_pi.shape[:-2] + (1, log_pi.shape[-1]))
        m = means.gather(-2, pick).squeeze(-2)
        s = log_s.gather(-2, pick).squeeze(-2).exp()
        u = torch.rand(m.shape, generator=generator).to(params.device).clamp(1e-5, 1 - 1e-5)
        y = (m + s * (torch.log(u) - torch.log1p(-u))).clamp(-1.0, 1.0)
        return torch.round((y + 1.0) * 127.5) / 255.0


def build_likelihood(kind: str = "bernoulli", n_mixtures: int = 5):
    """model.likelihood / model.n_mixtures -> the likelihood object."""
    if kind == "bernoulli":
        return BernoulliLikelihood()
    if kind == "dlogistic":
        return DiscretizedLogisticMixture(n_mixtures)
    raise ValueError(f"model.likelihood={kind!r} is not one of bernoulli, dlogistic")


__all__ = ["BernoulliLikelihood", "DiscretizedLogisticMixture", "build_likelihood",
           "log_sigmoid_difference", "LEVELS"]
