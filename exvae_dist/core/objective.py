"""The training objective (ELBO with KL warm-up) and the importance-sampled log-likelihood.

`VAEWithPrior` is the one module a trainer wraps (in DDP too): a single forward() encodes the
batch and the prior's exemplars together, evaluates the prior and returns the loss, so DDP
sees exactly one forward per backward. Pure torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..common.levels import from_bytes
from .int8 import LevelsLinear, int8_dot_products
from .models import LatentVariableModel, build_net
from .priors import DEFAULT_CHUNK, build_prior


@dataclass
class ELBOTerms:
    """loss: scalar -mean(ELBO_beta); the rest per example [B]: ELBO at beta, log p(x|z), KL."""

    loss: torch.Tensor
    elbo: torch.Tensor
    log_px: torch.Tensor
    kl: torch.Tensor
    grad_exemplars: int = -1  # exemplars encoded with gradients (-1: no exemplars re-encoded)


def kl_beta(epoch: int, warmup_epochs: int) -> float:
    """Linear KL warm-up: 1/W in the first epoch (0-based epoch 0), 1 from epoch W-1 on."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / warmup_epochs)


def learning_rate(epoch: int, lr: float, schedule: str, epochs: int) -> float:
    """The Adam learning rate of (0-based) `epoch`: `lr` throughout ("constant", the paper's),
    or half a cosine from `lr` in the first epoch towards 0 after the last of `epochs`
    ("cosine": a model of the same quality in fewer epochs, bench/README.md "Time to
    quality"). A function of the epoch alone, so a resumed run takes up the same rates."""
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"train.lr_schedule={schedule!r} is not one of constant, cosine")
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(epochs, 1)))


class VAEWithPrior(nn.Module):
    """An architecture and its prior over the top latent."""

    def __init__(self, net: LatentVariableModel, prior: nn.Module):
        super().__init__()
        self.net = net
        self.prior = prior

    @property
    def prior_kind(self) -> str:
        return self.prior.kind

    def log_prior(self, z: torch.Tensor, centres: Optional[torch.Tensor] = None,
                  exclude: Optional[torch.Tensor] = None, log_norm: Optional[torch.Tensor] = None,
                  chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
        """z: [B, d] -> log p(z) [B]; exemplar priors need `centres` [C, d]."""
        if self.prior_kind == "exemplar":
            if centres is None:
                raise ValueError("the exemplar prior needs centres (encoded exemplars)")
            return self.prior.log_prob(z, centres=centres, exclude=exclude, log_norm=log_norm,
                                       chunk=chunk)
        return self.prior.log_prob(z, encode_top=self.net.encode_top)

    def forward(self, x: torch.Tensor, beta: float = 1.0, exemplars: Optional[torch.Tensor] = None,
                exclude: Optional[torch.Tensor] = None, log_norm: Optional[torch.Tensor] = None,
                centres: Optional[torch.Tensor] = None) -> ELBOTerms:
        """One-sample ELBO of a batch.

        x:         [B, D] binary images
        exemplars: [C, D] images re-encoded WITH gradients as the prior's centres, or
        centres:   [C, d] precomputed centres (validation, no gradients into the encoder)
        exclude:   [B, C] bool leave-one-out mask; log_norm: [B] normalizer (see priors.py)
        """
        top = None
        if exemplars is not None:
            # Batch and exemplars are encoded in separate passes: concatenating them first
            # copies every exemplar image once more (78 MB per step at M = 25,000).
            top = self.net.encode_top(x)
            centres = self.net.encode_top(exemplars.to(x.dtype))[0]
        t = self.net.terms(x, 1, top=top)
        z = t.z_top[0]
        log_p = self.log_prior(z, centres, exclude, log_norm)
        kl = t.log_q[0] - t.log_p_cond[0] - log_p
        elbo = t.log_px[0] - beta * kl
        return ELBOTerms(loss=-elbo.mean(), elbo=elbo, log_px=t.log_px[0], kl=kl,
                         grad_exemplars=-1 if exemplars is None else exemplars.shape[0])


def build_model(cfg, image_shape=(1, 28, 28)) -> VAEWithPrior:
    """cfg: config.ExperimentConfig -> VAEWithPrior (architecture + prior)."""
    net = build_net(cfg.model, image_shape)
    x_dim = math.prod(image_shape)
    return VAEWithPrior(net, build_prior(cfg.prior, x_dim))


@torch.no_grad()
def encode_means(net: LatentVariableModel, images: torch.Tensor, batch_size: int = 2000,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Encoder means of many images, no gradients: [N, D] -> [N, d] (the exemplar cache).

    Float images in [0, 1] are encoded in `dtype`. uint8 grey levels (the cache refresh's
    exemplars: level p is p / 255) are encoded with the image layer in int8 arithmetic where
    the CPU has int8 dot products and the encoder starts with a linear layer (core/int8.py:
    1.45x faster at 1e7, means within ~1e-4 of float32's), else as p / 255 in float32.
    """
    levels = images.dtype == torch.uint8
    first = None
    if levels and images.device.type == "cpu" and net.image_linear is not None \
            and int8_dot_products():
        first = LevelsLinear(net.image_linear)
    out = []
    for start in range(0, images.shape[0], batch_size):
        part = images[start:start + batch_size]
        if first is not None:
            out.append(net.mean_after_image_linear(first(part)))
        else:
            out.append(net.encode_top(from_bytes(part) if levels else part.to(dtype))[0])
    return torch.cat(out) if out else torch.empty(0, net.top_dim)


@torch.no_grad()
def importance_log_likelihood(model: VAEWithPrior, x: torch.Tensor, n_samples: int = 5000,
                              centres: Optional[torch.Tensor] = None, sample_chunk: int = 500,
                              exemplar_chunk: int = DEFAULT_CHUNK,
                              log_prior: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                              ) -> torch.Tensor:
    """log p(x) ~= logmeanexp_s [log p(x|z_s) + log p(z_s) - log q(z_s|x)], z_s ~ q(z|x).

    x: [B, D] binary test images; centres: [N, d] ALL training exemplar means for the
    exemplar prior (no leave-one-out, normalizer N). Samples are drawn in chunks of
    `sample_chunk` per image so memory stays bounded; returns [B] in nats. `log_prior`
    replaces the prior's density: z [s, B, d] -> log p(z) [s, B] (evaluation/likelihood.py's
    certified exemplar pools); the samples and the estimator stay these.
    """
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    net = model.net
    top = net.encode_top(x)
    parts = []
    for start in range(0, n_samples, sample_chunk):
        s = min(sample_chunk, n_samples - start)
        t = net.terms(x, s, top=top)
        if log_prior is not None:
            log_p = log_prior(t.z_top)
        else:
            z = t.z_top.reshape(-1, t.z_top.shape[-1])
            log_p = model.log_prior(z, centres, chunk=exemplar_chunk).reshape(s, -1)
        log_w = t.log_px + t.log_p_cond + log_p - t.log_q
        parts.append(torch.logsumexp(log_w, dim=0))
    return torch.logsumexp(torch.stack(parts), dim=0) - math.log(n_samples)
