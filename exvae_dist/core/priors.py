"""Priors over the top latent: standard Gaussian, VampPrior, and the exemplar (Parzen) prior.

Pure torch. The exemplar prior's density is

    log p(z) = logsumexp_{c kept} log Normal(z; centre_c, exp(log_var) I) - log(#kept)

computed in blocks of centres with a running logsumexp so memory stays O(B * chunk), and from
squared distances (never from exp of a density) so far-away centres cannot underflow it.
Centres too many to hold (validation over 1e7 exemplars) come as `CentreBlocks`, read one
block at a time (train/refresh.StoreLatents reads them from the store).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Protocol, Union

import torch
from torch import nn

from .models.layers import LOG_2PI, standard_normal_log_prob

DEFAULT_CHUNK = 2048  # [B, chunk] blocks that stay in cache (measured: 2048 beat 8192 by 1.5x)


def squared_distances(z: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """||z_b - c_j||^2: z [B, d], centres [C, d] -> [B, C], clamped at 0 against round-off."""
    d2 = torch.addmm((z * z).sum(1, keepdim=True), z, centres.t(), alpha=-2.0)
    d2 = d2 + (centres * centres).sum(1)[None, :]
    return d2.clamp_min_(0.0) if not d2.requires_grad else d2.clamp_min(0.0)


def exp_floor(dtype: torch.dtype) -> float:
    """The exp argument below which a term is negligible and CPU exp kernels get slow:
    exp(-80) ~ 1.8e-35 for float32 and narrower types, exp(-700) for float64."""
    return -80.0 if dtype in (torch.float32, torch.bfloat16, torch.float16) else -700.0


def fast_logsumexp(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """torch.logsumexp over `dim`, skipping terms below exp(-80) (float32) / exp(-700) (float64)
    relative to the row's largest.

    CPU exp kernels take a slow path for arguments far below zero: on a trained model most
    exemplars are far from a sample, and plain logsumexp spent ~15x longer in exp than the
    same work with such arguments clamped. Skipped terms change the result by less than
    (number of terms) * 1.8e-35 relative (float32). Rows that are all -inf stay -inf.
    """
    floor = exp_floor(x.dtype)
    top = x.detach().amax(dim, keepdim=True)
    empty = torch.isinf(top) & (top < 0)
    top = top.masked_fill(empty, 0.0)
    shifted = x - top
    keep = shifted > floor
    total = (shifted.clamp_min(floor).exp() * keep).sum(dim)
    return (total.log() + top.squeeze(dim)).masked_fill(empty.squeeze(dim), float("-inf"))


def _block_logits(z_scaled: torch.Tensor, inv_var: torch.Tensor, centres: torch.Tensor,
                  exclude: Optional[torch.Tensor], start: int, chunk: int) -> torch.Tensor:
    """(z.c - |c|^2 / 2) / s^2 for the centres start:start+chunk, -inf where excluded: [B, chunk]
    (the log-density of each centre less a per-row constant)."""
    block = centres[start:start + chunk]
    bias = (-0.5 * inv_var) * (block * block).sum(1)
    logits = torch.addmm(bias[None, :], z_scaled, block.t())
    if exclude is not None:
        logits = logits.masked_fill(exclude[:, start:start + chunk], float("-inf"))
    return logits


def exemplar_log_prob(z: torch.Tensor, centres: torch.Tensor, log_var: torch.Tensor,
                      exclude: Optional[torch.Tensor] = None,
                      log_norm: Optional[torch.Tensor] = None,
                      chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Parzen-window log-density of each z under isotropic Gaussians at the kept centres.

    z:        [B, d]
    centres:  [C, d]
    log_var:  scalar tensor, the shared log-variance lambda (s^2 = exp(lambda))
    exclude:  optional bool [B, C]; True leaves centre c out of row b's mixture (leave-one-out)
    log_norm: optional [B] (or scalar) log of the normalizer to use instead of log(#kept);
              RAT passes log|S minus {i}| so the truncated mixture is a lower bound
    returns:  [B]; -inf for a row with no kept centre
    """
    if z.dim() != 2 or centres.dim() != 2 or z.shape[1] != centres.shape[1]:
        raise ValueError(f"z must be [B, d] and centres [C, d] with the same d; got "
                         f"{tuple(z.shape)} and {tuple(centres.shape)}")
    if exclude is not None and exclude.shape != (z.shape[0], centres.shape[0]):
        raise ValueError(f"exclude must be [B, C] = {(z.shape[0], centres.shape[0])}, "
                         f"got {tuple(exclude.shape)}")
    if log_norm is not None and torch.as_tensor(log_norm).shape not in ((), (z.shape[0],)):
        # a [B, 1] normalizer would silently broadcast the result to [B, B]
        raise ValueError(f"log_norm must be a scalar or [B] = [{z.shape[0]}], "
                         f"got {tuple(torch.as_tensor(log_norm).shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of centres, got {chunk}")
    log_var = torch.as_tensor(log_var, dtype=z.dtype, device=z.device).reshape(())
    d = z.shape[1]
    inv_var = torch.exp(-log_var)
    # -|z - c|^2 / 2s^2 = (z.c - |c|^2 / 2) / s^2 - |z|^2 / 2s^2: the last term is constant per
    # row and leaves the logsumexp, so each block is ONE addmm and one logsumexp over
    # [B, chunk] (the expanded form made ~6 passes over it: this is memory-bound work).
    z_scaled = z * inv_var
    parts = []
    for start in range(0, centres.shape[0], chunk):
        parts.append(fast_logsumexp(_block_logits(z_scaled, inv_var, centres, exclude, start,
                                                  chunk), dim=1))
    if not parts:  # no centres at all: every row has no kept centre
        parts.append(z.new_full((z.shape[0],), float("-inf")))
    lse = parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts, 1), dim=1)
    if log_norm is None:
        kept = centres.shape[0] - (exclude.sum(1) if exclude is not None else 0)
        log_norm = torch.log(torch.as_tensor(kept, dtype=z.dtype, device=z.device).clamp_min(1))
    log_norm = torch.as_tensor(log_norm, dtype=z.dtype, device=z.device)
    return lse - (0.5 * inv_var) * (z * z).sum(1) - log_norm - 0.5 * d * (LOG_2PI + log_var)


class CentreBlocks(Protocol):
    """[N, d] centres read a block at a time: the exact prior over all N without holding N."""

    shape: tuple  # (N, d)
    device: torch.device

    def blocks(self) -> Iterator[torch.Tensor]:
        """The centres in row order, as [rows, d] tensors on `device`."""

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """[len(ids), d]: the centres of the given rows (prior samples)."""


Centres = Union[torch.Tensor, CentreBlocks]


def streamed_exemplar_log_prob(z: torch.Tensor, centres: CentreBlocks, log_var: torch.Tensor,
                               chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """exemplar_log_prob over ALL N centres (no leave-one-out, normalizer N), one block at a
    time: each block's mixture without its normalizer, combined by logsumexp (the constant
    terms are the same in every block), minus log N. z [B, d] -> [B]."""
    n = int(centres.shape[0])
    parts = [exemplar_log_prob(z, block, log_var, log_norm=torch.zeros((), dtype=z.dtype,
                                                                         device=z.device),
                               chunk=chunk)
             for block in centres.blocks()]
    if not parts or n == 0:
        return z.new_full((z.shape[0],), float("-inf"))
    return torch.logsumexp(torch.stack(parts, 1), dim=1) - math.log(n)


def mixture_log_prob(z: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor) -> torch.Tensor:
    """Uniform mixture of diagonal Gaussians (the VampPrior): z [B, d], means/logvars [K, d] -> [B].

    sum_j (z_j - m_kj)^2 / v_kj is expanded into [B, d] x [d, K] products, so no [B, K, d]
    tensor is made: at B = 100, K = 500, d = 40 the broadcast form and its backward took
    about a third of a VampPrior step. The expansion cancels (z^2/v and m^2/v are large where
    v is small), so it runs in float64, which keeps its round-off far below float32's.
    """
    prec = torch.exp(-logvars.double())  # [K, d]
    z64, m64 = z.double(), means.double()
    quad = ((z64 * z64) @ prec.t() - 2.0 * (z64 @ (m64 * prec).t())
            + (m64 * m64 * prec).sum(1))  # [B, K]
    log_comp = -0.5 * (z.shape[1] * LOG_2PI + logvars.double().sum(1) + quad)
    return (torch.logsumexp(log_comp, dim=1) - math.log(means.shape[0])).to(z.dtype)


class GaussianPrior(nn.Module):
    kind = "gaussian"

    def log_prob(self, z: torch.Tensor, **_) -> torch.Tensor:
        return standard_normal_log_prob(z)


class VampPrior(nn.Module):
    """Mixture of the posterior at K learned pseudo-inputs (Tomczak & Welling)."""

    kind = "vampprior"

    def __init__(self, n_pseudo: int, x_dim: int):
        super().__init__()
        # The reference initialises pseudo-inputs near 0.05 and keeps them in [0, 1].
        self.pseudo_raw = nn.Parameter(0.05 + 0.01 * torch.randn(n_pseudo, x_dim))

    def pseudo_inputs(self) -> torch.Tensor:
        return torch.nn.functional.hardtanh(self.pseudo_raw, 0.0, 1.0)

    def log_prob(self, z: torch.Tensor, encode_top: Callable, **_) -> torch.Tensor:
        means, logvars = encode_top(self.pseudo_inputs())
        return mixture_log_prob(z, means, logvars)


class ExemplarPrior(nn.Module):
    """Holds the one learned log-variance lambda; the centres come from the batch's exemplars."""

    kind = "exemplar"

    def __init__(self, init_log_var: float = 0.0):
        super().__init__()
        self.log_var = nn.Parameter(torch.tensor(float(init_log_var)))

    def log_prob(self, z: torch.Tensor, centres: Centres,
                 exclude: Optional[torch.Tensor] = None, log_norm: Optional[torch.Tensor] = None,
                 chunk: int = DEFAULT_CHUNK, **_) -> torch.Tensor:
        if not isinstance(centres, torch.Tensor):
            if exclude is not None or log_norm is not None:
                raise ValueError("streamed centres (CentreBlocks) score the full prior over "
                                 "all N: no exclude / log_norm")
            return streamed_exemplar_log_prob(z, centres, self.log_var, chunk)
        return exemplar_log_prob(z, centres, self.log_var, exclude, log_norm, chunk)


def build_prior(cfg, x_dim: int) -> nn.Module:
    """cfg: config.PriorConfig -> the prior module."""
    if cfg.kind == "gaussian":
        return GaussianPrior()
    if cfg.kind == "vampprior":
        return VampPrior(cfg.n_pseudo, x_dim)
    if cfg.kind == "exemplar":
        return ExemplarPrior(cfg.init_log_var)
    raise ValueError(f"prior.kind={cfg.kind!r} is not one of gaussian, vampprior, exemplar")
