"""Pure torch architectures: MLP VAE, two-level HVAE, convolutional HVAE."""

from __future__ import annotations

from .base import LatentTerms, LatentVariableModel
from .vae import MLPVAE


def build_net(cfg, image_shape=(1, 28, 28)) -> LatentVariableModel:
    """cfg: config.ModelConfig -> the architecture it names."""
    x_dim = 1
    for s in image_shape:
        x_dim *= s
    from .likelihoods import build_likelihood

    common = dict(hidden=cfg.hidden, z_dim=cfg.z_dim, logvar_min=cfg.logvar_min,
                  logvar_max=cfg.logvar_max,
                  likelihood=build_likelihood(getattr(cfg, "likelihood", "bernoulli"),
                                              getattr(cfg, "n_mixtures", 5)))
    if cfg.arch == "vae":
        return MLPVAE(x_dim=x_dim, **common)
    if cfg.arch == "hvae":
        from .hvae import HVAE
        return HVAE(x_dim=x_dim, **common)
    if cfg.arch == "convhvae":
        from .convhvae import ConvHVAE
        return ConvHVAE(image_shape=tuple(image_shape), **common)
    raise ValueError(f"model.arch={cfg.arch!r} is not one of vae, hvae, convhvae")


__all__ = ["LatentTerms", "LatentVariableModel", "MLPVAE", "build_net"]
