"""Building blocks shared by the architectures: gated layers and Gaussian helpers."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LOG_2PI = math.log(2.0 * math.pi)


class GatedDense(nn.Module):
    """h(x) * sigmoid(g(x)): the gated dense layer of the VampPrior / Exemplar VAE MLPs.

    Both halves come from one Linear of twice the width, so a layer is one matmul, and F.glu
    gates them in one kernel whose backward writes one gradient (splitting and multiplying
    by hand costs a large concatenation in backward: a third of an exact-prior step).
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_out = n_out
        self.linear = nn.Linear(n_in, 2 * n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.glu(self.linear(x), dim=-1)


class GatedConv2d(nn.Module):
    """Convolutional gated layer: conv_h(x) * sigmoid(conv_g(x)), one conv of 2x channels."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.c_out = c_out
        self.conv = nn.Conv2d(c_in, 2 * c_out, kernel, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.glu(self.conv(x), dim=1)


class GaussianHead(nn.Module):
    """Linear mean and hardtanh-bounded log-variance (the reference code bounds it to [-6, 2])."""

    def __init__(self, n_in: int, z_dim: int, logvar_min: float, logvar_max: float):
        super().__init__()
        self.mean = nn.Linear(n_in, z_dim)
        self.logvar = nn.Linear(n_in, z_dim)
        self.bounds = (logvar_min, logvar_max)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(h), F.hardtanh(self.logvar(h), *self.bounds)


def diag_normal_log_prob(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log Normal(z; mean, diag(exp(logvar))) summed over the last axis; broadcasts."""
    return -0.5 * (LOG_2PI + logvar + (z - mean).pow(2) * torch.exp(-logvar)).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log Normal(z; 0, I) summed over the last axis."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over the last axis; x may be grey (soft targets)."""
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def he_init(module: nn.Module) -> None:
    """He-normal weights, zero biases for linear and conv layers (the reference initialisation)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
