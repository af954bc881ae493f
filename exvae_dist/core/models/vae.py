"""The one-stochastic-layer MLP VAE of the paper: gated dense 784-300-300-(z) and its mirror."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import LatentTerms, LatentVariableModel
from .layers import GatedDense, GaussianHead, diag_normal_log_prob, he_init
from .likelihoods import BernoulliLikelihood


class MLPVAE(LatentVariableModel):
    def __init__(self, x_dim: int = 784, hidden: int = 300, z_dim: int = 40,
                 logvar_min: float = -6.0, logvar_max: float = 2.0, likelihood=None):
        super().__init__()
        self.likelihood = likelihood or BernoulliLikelihood()
        self.top_dim = z_dim
        self.encoder = nn.Sequential(GatedDense(x_dim, hidden), GatedDense(hidden, hidden))
        self.q_z = GaussianHead(hidden, z_dim, logvar_min, logvar_max)
        self.decoder = nn.Sequential(GatedDense(z_dim, hidden), GatedDense(hidden, hidden),
                                     nn.Linear(hidden, x_dim * self.likelihood.params_per_dim))
        he_init(self)

    def encode_top(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_z(self.encoder(x))

    @property
    def image_linear(self) -> nn.Linear:
        return self.encoder[0].linear

    def mean_after_image_linear(self, pre):
        return self.q_z.mean(self.encoder[1:](F.glu(pre, dim=-1)))

    def terms(self, x, n_samples=1, top=None) -> LatentTerms:
        mean, logvar = self.encode_top(x) if top is None else top
        eps = torch.randn((n_samples,) + mean.shape, dtype=mean.dtype, device=mean.device)
        z = mean + torch.exp(0.5 * logvar) * eps  # [S, B, d]
        log_px = self.likelihood.log_prob(self.decoder(z), x)
        return LatentTerms(log_px=log_px,
                           log_q=diag_normal_log_prob(z, mean, logvar),
                           log_p_cond=torch.zeros_like(log_px),
                           z_top=z)

    def decoder_params(self, z_top):
        return self.decoder(z_top)
