"""The evaluation pictures: samples, exemplar-conditioned samples, reconstructions, latent
interpolations and a t-SNE map of test means. Every function writes one PNG (atomically,
through sampling.save_grid or a temp name) and returns its path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core.objective import VAEWithPrior
from ..core.sampling import sample_images, sample_top, save_grid


@torch.no_grad()
def random_samples(model: VAEWithPrior, centres: Optional[torch.Tensor], path: Path,
                   image_shape, n: int = 100, seed: int = 0) -> Path:
    """n prior samples (decoder means), 10 per row."""
    gen = torch.Generator().manual_seed(seed)
    images = sample_images(model, n, centres, generator=gen)
    return save_grid(images, path, image_shape, nrow=10,
                     title=f"{model.prior_kind} prior: random samples (decoder means)")


@torch.no_grad()
def exemplar_samples(model: VAEWithPrior, centres: torch.Tensor, exemplars: torch.Tensor,
                     exemplar_ids: torch.Tensor, path: Path, image_shape,
                     per_row: int = 9, seed: int = 0) -> Path:
    """One row per exemplar: the exemplar image [D] in the first column, then `per_row`
    samples with z ~ Normal(mu(exemplar), s^2 I) (decoder means).

    centres: [N, d]; exemplars: [N, D] images; exemplar_ids: [R] rows to show.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in exemplar_ids.tolist():
        ids = torch.full((per_row,), i, dtype=torch.int64)
        z = sample_top(model, per_row, centres, exemplar_ids=ids, generator=gen)
        rows.append(torch.cat([exemplars[i][None].float(), model.net.decode_top(z)]))
    return save_grid(torch.cat(rows), path, image_shape, nrow=per_row + 1,
                     title="exemplar-conditioned samples (first column: the exemplar)")


@torch.no_grad()
def reconstructions(model: VAEWithPrior, x: torch.Tensor, path: Path, image_shape,
                    per_row: int = 10) -> Path:
    """Pairs of rows: test images x [n, D], then decode_top(mu(x)) below them."""
    recon = model.net.decode_top(model.net.encode_top(x)[0])
    rows = []
    for start in range(0, x.shape[0], per_row):
        rows += [x[start:start + per_row], recon[start:start + per_row]]
    return save_grid(torch.cat(rows), path, image_shape, nrow=per_row,
                     title="reconstructions (odd rows: test images, even rows: decoded means)")


@torch.no_grad()
def interpolations(model: VAEWithPrior, images: torch.Tensor, pairs: torch.Tensor, path: Path,
                   image_shape, steps: int = 10) -> Path:
    """One row per pair (a, b) of image ids: image a, decode((1 - t) mu_a + t mu_b) for
    `steps` values of t in [0, 1], image b. images: [N, D]; pairs: [R, 2]."""
    mu = model.net.encode_top(images[pairs.reshape(-1)].float())[0].reshape(-1, 2, model.net.top_dim)
    t = torch.linspace(0.0, 1.0, steps)[None, :, None]
    z = (1 - t) * mu[:, :1] + t * mu[:, 1:]  # [R, steps, d]
    decoded = model.net.decode_top(z.reshape(-1, z.shape[-1])).reshape(len(pairs), steps, -1)
    rows = [torch.cat([images[a][None].float(), decoded[r], images[b][None].float()])
            for r, (a, b) in enumerate(pairs.tolist())]
    return save_grid(torch.cat(rows), path, image_shape, nrow=steps + 2,
                     title="latent interpolation between two exemplars (ends: the exemplars)")


def tsne_map(means: np.ndarray, labels: Optional[np.ndarray], path: Path, seed: int = 0,
             title: str = "t-SNE of test encoder means") -> Path:
    """means: [n, d] -> a 2-D t-SNE scatter coloured by label (uncoloured if labels is None)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(2.0, (len(means) - 1) / 3))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        np.asarray(means, dtype=np.float32))
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=2, c="k")
    else:
        sc = ax.scatter(xy[:, 0], xy[:, 1], s=2, c=labels, cmap="tab10" if labels.max() < 10
                        else "nipy_spectral")
        if labels.max() < 10:
            ax.legend(*sc.legend_elements(), loc="best", fontsize=6, markerscale=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure as a PNG, written through a temp name (never half a picture)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path
