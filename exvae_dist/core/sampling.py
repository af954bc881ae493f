"""Drawing images from a trained model (runs/figures.py saves them as grids)."""

from __future__ import annotations

from typing import Optional

import torch

from .objective import VAEWithPrior


@torch.no_grad()
def sample_top(model: VAEWithPrior, n: int, centres: Optional[torch.Tensor] = None,
               exemplar_ids: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """n draws of the top latent from the prior: [n, d] (see sample_top_with_sources)."""
    return sample_top_with_sources(model, n, centres, exemplar_ids, generator)[0]


@torch.no_grad()
def sample_top_with_sources(model: VAEWithPrior, n: int, centres: Optional[torch.Tensor] = None,
                            exemplar_ids: Optional[torch.Tensor] = None,
                            generator: Optional[torch.Generator] = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """n draws of the top latent from the prior and the mixture component each came from:
    (z [n, d], ids [n] int64).

    Exemplar prior: pick exemplar ids uniformly (or use `exemplar_ids`, [n]) and add
    Normal(0, exp(lambda) I) noise around their means `centres` [N, d]; ids are exemplar rows.
    VampPrior: ids are pseudo-input indices. Gaussian prior: ids are -1.
    """
    d = model.net.top_dim
    # drawn on the CPU (where `generator` lives), then moved: the same draws on every device
    device = next(model.parameters()).device
    eps = torch.randn(n, d, generator=generator).to(device)
    if model.prior_kind == "gaussian":
        return eps, torch.full((n,), -1, dtype=torch.int64)
    if model.prior_kind == "vampprior":
        mean, logvar = model.net.encode_top(model.prior.pseudo_inputs())
        pick = torch.randint(0, mean.shape[0], (n,), generator=generator)
        return mean[pick] + torch.exp(0.5 * logvar[pick]) * eps, pick
    if centres is None:
        raise ValueError("sampling from the exemplar prior needs the exemplar means (centres)")
    if exemplar_ids is None:
        exemplar_ids = torch.randint(0, centres.shape[0], (n,), generator=generator)
    exemplar_ids = torch.as_tensor(exemplar_ids, dtype=torch.int64)
    if exemplar_ids.shape != (n,):
        raise ValueError(f"exemplar_ids must be [n] = [{n}], got {tuple(exemplar_ids.shape)}")
    if n and (exemplar_ids.min() < 0 or exemplar_ids.max() >= centres.shape[0]):
        raise ValueError(f"exemplar ids must lie in 0..{centres.shape[0] - 1}")
    z = centres[exemplar_ids.to(centres.device)] + torch.exp(0.5 * model.prior.log_var) * eps
    return z, exemplar_ids


@torch.no_grad()
def sample_images(model: VAEWithPrior, n: int, centres: Optional[torch.Tensor] = None,
                  exemplar_ids: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pixel means of p(x|z) for n prior draws: [n, D] in [0, 1]."""
    return model.net.decode_top(sample_top(model, n, centres, exemplar_ids, generator))
