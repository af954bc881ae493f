"""The two-stochastic-layer HVAE of the VampPrior paper (Tomczak & Welling 2018), MLP version.

    q(z2 | x)      gated dense x -> h -> h, Gaussian head             (z2: the TOP latent)
    q(z1 | x, z2)  x -> gated h, z2 -> gated h, joined -> gated h, Gaussian head
    p(z1 | z2)     gated dense z2 -> h -> h, Gaussian head (learned; hardtanh-bounded logvar)
    p(x | z1, z2)  z1 -> gated h, z2 -> gated h, joined -> gated h -> Bernoulli logits

The prior (Gaussian, VampPrior or exemplar) sits on z2; p(z1 | z2) belongs to the model and
enters the ELBO as `log_p_cond`. `TwoLevelVAE` holds what the MLP and convolutional versions
share: sampling, the assembly of the ELBO terms, p(z1 | z2) and decoding from z2.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import LatentTerms, LatentVariableModel
from .layers import GatedDense, GaussianHead, diag_normal_log_prob, he_init
from .likelihoods import BernoulliLikelihood


def _reparameterize(mean: torch.Tensor, logvar: torch.Tensor,
                    shape: torch.Size | None = None) -> torch.Tensor:
    """Draws of Normal(mean, exp(logvar)) of `shape` (default mean.shape; mean broadcasts to it)."""
    shape = mean.shape if shape is None else shape
    eps = torch.randn(shape, dtype=mean.dtype, device=mean.device)
    return mean + torch.exp(0.5 * logvar) * eps


class TwoLevelVAE(LatentVariableModel):
    """z2 ~ q(z2|x), z1 ~ q(z1|x,z2); generative p(z2) p(z1|z2) p(x|z1,z2).

    Subclasses build q(z2|x) (`encode_top`), q(z1|x,z2) (`posterior_z1`) and the decoder
    (`decoder_logits`); this class builds p(z1|z2), identical in both papers' models.
    Every method broadcasts over leading sample axes of the latents: z [..., B, d].
    """

    def __init__(self, hidden: int, z_dim: int, logvar_min: float, logvar_max: float,
                 likelihood=None):
        super().__init__()
        self.likelihood = likelihood or BernoulliLikelihood()
        self.top_dim = z_dim
        self.p_z1_net = nn.Sequential(GatedDense(z_dim, hidden), GatedDense(hidden, hidden))
        self.p_z1_head = GaussianHead(hidden, z_dim, logvar_min, logvar_max)

    def posterior_z1(self, x: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, D], z2: [..., B, d] -> mean, logvar of q(z1 | x, z2), each [..., B, d]."""
        raise NotImplementedError

    def decoder_logits(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """z1, z2: [..., B, d] -> parameters of p(x | z1, z2), [..., B, P * D] (Bernoulli: logits)."""
        raise NotImplementedError

    def prior_z1(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z2: [..., B, d] -> mean, logvar of p(z1 | z2), each [..., B, d]."""
        return self.p_z1_head(self.p_z1_net(z2))

    def terms(self, x, n_samples=1, top=None) -> LatentTerms:
        """x: [B, D] -> LatentTerms with log_px, log_q, log_p_cond [S, B] and z_top = z2 [S, B, d].

        log_q = log q(z2|x) + log q(z1|x,z2); log_p_cond = log p(z1|z2); log_px = log p(x|z1,z2).
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}")
        mean2, logvar2 = self.encode_top(x) if top is None else top
        z2 = _reparameterize(mean2, logvar2, (n_samples,) + mean2.shape)  # [S, B, d]
        mean1, logvar1 = self.posterior_z1(x, z2)
        z1 = _reparameterize(mean1, logvar1)  # [S, B, d]
        p_mean1, p_logvar1 = self.prior_z1(z2)
        logits = self.decoder_logits(z1, z2)
        return LatentTerms(log_px=self.likelihood.log_prob(logits, x),
                           log_q=diag_normal_log_prob(z2, mean2, logvar2)
                           + diag_normal_log_prob(z1, mean1, logvar1),
                           log_p_cond=diag_normal_log_prob(z1, p_mean1, p_logvar1),
                           z_top=z2)

    def decoder_params(self, z_top):
        """z_top = z2: [..., B, d] -> decoder parameters, with z1 at the mean of p(z1|z2)."""
        z1, _ = self.prior_z1(z_top)
        return self.decoder_logits(z1, z_top)


class HVAE(TwoLevelVAE):
    """The MLP HVAE: every hidden layer a gated dense layer of width `hidden` (300 in the paper)."""

    def __init__(self, x_dim: int = 784, hidden: int = 300, z_dim: int = 40,
                 logvar_min: float = -6.0, logvar_max: float = 2.0, likelihood=None):
        super().__init__(hidden, z_dim, logvar_min, logvar_max, likelihood)
        self.q_z2_net = nn.Sequential(GatedDense(x_dim, hidden), GatedDense(hidden, hidden))
        self.q_z2_head = GaussianHead(hidden, z_dim, logvar_min, logvar_max)
        self.q_z1_x = GatedDense(x_dim, hidden)
        self.q_z1_z2 = GatedDense(z_dim, hidden)
        self.q_z1_joint = GatedDense(2 * hidden, hidden)
        self.q_z1_head = GaussianHead(hidden, z_dim, logvar_min, logvar_max)
        self.p_x_z1 = GatedDense(z_dim, hidden)
        self.p_x_z2 = GatedDense(z_dim, hidden)
        self.p_x_joint = nn.Sequential(GatedDense(2 * hidden, hidden), nn.Linear(hidden, x_dim * self.likelihood.params_per_dim))
        he_init(self)

    def encode_top(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_z2_head(self.q_z2_net(x))

    @property
    def image_linear(self) -> nn.Linear:
        return self.q_z2_net[0].linear

    def mean_after_image_linear(self, pre):
        return self.q_z2_head.mean(self.q_z2_net[1:](F.glu(pre, dim=-1)))

    def posterior_z1(self, x, z2):
        # The x branch runs once per image and is shared by all S samples of z2.
        hz = self.q_z1_z2(z2)
        hx = self.q_z1_x(x).expand_as(hz)
        return self.q_z1_head(self.q_z1_joint(torch.cat([hx, hz], dim=-1)))

    def decoder_logits(self, z1, z2):
        return self.p_x_joint(torch.cat([self.p_x_z1(z1), self.p_x_z2(z2)], dim=-1))
