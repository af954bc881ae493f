"""Drawing images from a trained model, and saving them as grids (PNG via matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
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


def as_rgb(image, image_shape) -> np.ndarray:
    """One flat image [D] in [0, 1] -> [H, W, 3] for display: colour (C = 3) as is, grey
    (C = 1) inverted (ink dark on white, as the grey grids always showed it)."""
    c, h, w = image_shape
    a = np.clip(np.asarray(image, dtype=np.float32).reshape(c, h, w), 0.0, 1.0)
    if c == 3:
        return a.transpose(1, 2, 0)
    return np.repeat(1.0 - a[0][..., None], 3, axis=2)


def save_grid(images, path: str | os.PathLike, image_shape=(1, 28, 28), nrow: int = 10,
              title: Optional[str] = None) -> Path:
    """images: [n, D] in [0, 1] -> a PNG grid with nrow images per row, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images)
    c, h, w = image_shape
    n = images.shape[0]
    rows = int(np.ceil(n / nrow))
    # colour images as RGB (on white); grey ones with ink dark on white, as before
    canvas = np.ones((rows * (h + 2), nrow * (w + 2), 3), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[r * (h + 2) + 1: r * (h + 2) + 1 + h,
               col * (w + 2) + 1: col * (w + 2) + 1 + w] = as_rgb(images[i], image_shape)
    fig = plt.figure(figsize=(nrow * 0.6, rows * 0.6 + (0.4 if title else 0)), dpi=100)
    plt.imshow(canvas, vmin=0, vmax=1, interpolation="nearest")
    plt.axis("off")
    if title:
        plt.title(title, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    os.replace(tmp, path)
    return path
