"""The interface every architecture implements, so priors and objectives need not know which.

An architecture has a TOP latent z (z for the VAE, z2 for the hierarchical models) on which
the prior (Gaussian, VampPrior or exemplar) sits; everything below the top latent (p(z1|z2)
and the decoder) belongs to the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .likelihoods import BernoulliLikelihood


@dataclass
class LatentTerms:
    """Per-sample terms of one or more posterior samples; every tensor is [S, B] but z_top [S, B, d].

    log_px:     log p(x | latents)
    log_q:      log q(all latents | x)
    log_p_cond: log p(lower latents | z_top) (0 for a one-layer VAE)
    z_top:      the sampled top latent, where the prior is evaluated
    """

    log_px: torch.Tensor
    log_q: torch.Tensor
    log_p_cond: torch.Tensor
    z_top: torch.Tensor


class LatentVariableModel(nn.Module):
    """Base class: an encoder to the top latent, and the sampled terms of the ELBO."""

    top_dim: int

    def encode_top(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, D] in [0, 1] -> mean, logvar of q(z_top | x), each [B, top_dim]."""
        raise NotImplementedError

    # The nn.Linear that reads the image, where the encoder starts with one (else None), and
    # the rest of the encoder's mean from its output: core/int8.py runs that layer on grey
    # levels for the cache refresh, which needs the means only
    image_linear: nn.Linear | None = None

    def mean_after_image_linear(self, pre: torch.Tensor) -> torch.Tensor:
        """image_linear(x) [B, H] -> encode_top(x)[0]."""
        raise NotImplementedError

    def terms(self, x: torch.Tensor, n_samples: int = 1,
              top: tuple[torch.Tensor, torch.Tensor] | None = None) -> LatentTerms:
        """Samples n_samples posterior draws per image; `top` reuses an encode_top(x) result."""
        raise NotImplementedError

    # p(x|z): models/likelihoods.py (Bernoulli unless the architecture was given another)
    likelihood = BernoulliLikelihood()

    def decoder_params(self, z_top: torch.Tensor) -> torch.Tensor:
        """z_top: [..., B, top_dim] -> the likelihood's parameters [..., B, P * D] (lower
        latents at their means)."""
        raise NotImplementedError

    def decode_top(self, z_top: torch.Tensor) -> torch.Tensor:
        """z_top: [B, top_dim] -> pixel means [B, D] in [0, 1] (lower latents at their means);
        for the Bernoulli likelihood the pixel probabilities."""
        return self.likelihood.mean(self.decoder_params(z_top))
