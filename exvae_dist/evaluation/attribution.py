"""Which exemplars carry an image's prior mass, and whether generated images copy training
ones (commands/explain.py is the command line).

Attribution (exemplar prior). For an image x and exemplar n,

    w_n(x) = E_{q(z|x)} [ N(z; mu_n, s^2 I) / sum_m N(z; mu_m, s^2 I) ]

estimated with S posterior samples (--samples): the posterior responsibility of exemplar n,
averaged over where the encoder puts x. The weights of an image sum to 1 over all N
exemplars of the set in use (eval.exemplars). Written: attributions.json (per image: its
top-k exemplars with weights and labels, the top-k mass and the effective number of
exemplars 1 / sum w^2; for images from `generate`, the exemplar each was drawn from and its
rank) and attributions.png (the image, then its top exemplars with their weights).

Memorisation check (any prior). N generated images (decoder means) against the images the
model draws from (the exemplar set in use: the training images unless it was grown) in pixel
space: the Euclidean distance of each to its nearest training image, next to
the same distance for N test images (the typical distance of a new image from the data the
model saw). Generated images much closer to the training set than test images are, are
near-copies. Both on 8-bit grey levels (binary datasets are viewed as the grey levels they
were binarized from). Written: memorisation.json and memorisation.png (histograms).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core.objective import VAEWithPrior
from ..core.priors import squared_distances
from ..runs.figures import as_rgb, save_figure

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ attribution

@torch.no_grad()
def attribution_weights(model: VAEWithPrior, x: torch.Tensor, centres: torch.Tensor,
                        n_samples: int = 100, generator: Optional[torch.Generator] = None,
                        sample_chunk: int = 256) -> torch.Tensor:
    """x: [B, D] images, centres: [N, d] -> weights [B, N] (float64), each row summing to 1.

    Samples z ~ q(z|x) are drawn on the CPU from `generator`; the softmax over the N
    exemplars is taken per sample (the kernel's normalizing constants cancel) and averaged.
    """
    if model.prior_kind != "exemplar":
        raise ValueError(f"attribution needs the exemplar prior; this model has a "
                         f"{model.prior_kind} prior")
    if n_samples < 1:
        raise ValueError(f"--samples must be positive, got {n_samples}")
    mean, logvar = model.net.encode_top(x)
    inv_var = torch.exp(-model.prior.log_var.double())
    c = centres.double()
    out = torch.zeros(x.shape[0], c.shape[0], dtype=torch.float64)
    for b in range(x.shape[0]):
        for start in range(0, n_samples, sample_chunk):
            s = min(sample_chunk, n_samples - start)
            eps = torch.randn(s, mean.shape[1], generator=generator, dtype=torch.float64)
            z = mean[b].double() + torch.exp(0.5 * logvar[b].double()) * eps.to(mean.device)
            logits = -0.5 * inv_var * squared_distances(z, c)  # [s, N]
            out[b] += torch.softmax(logits, dim=1).sum(0).cpu()
    return out / n_samples


def summarize(weights: torch.Tensor, k: int, labels: Optional[np.ndarray],
              sources: Optional[np.ndarray] = None) -> list[dict]:
    """weights [B, N] -> per image: top-k ids, weights, labels, top-k mass, effective number."""
    top = torch.topk(weights, min(k, weights.shape[1]), dim=1)
    rows = []
    for b in range(weights.shape[0]):
        ids = top.indices[b].tolist()
        entry = {
            "top_exemplars": ids,
            "top_weights": [float(w) for w in top.values[b].tolist()],
            "top_labels": None if labels is None else [int(labels[i]) for i in ids],
            "top_k_mass": float(top.values[b].sum()),
            "effective_exemplars": float(1.0 / (weights[b] ** 2).sum()),
            "weight_sum": float(weights[b].sum()),
        }
        if sources is not None and sources[b] >= 0:
            src = int(sources[b])
            entry["source_exemplar"] = src
            entry["source_weight"] = float(weights[b, src])
            entry["source_rank"] = int((weights[b] > weights[b, src]).sum()) + 1
        rows.append(entry)
    return rows


def attribution_grid(images: np.ndarray, rows: list[dict], exemplar_images: np.ndarray,
                     image_shape, path: Path, title: str) -> Path:
    """One row per image: the image, then its top exemplars captioned with their weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(len(r["top_exemplars"]) for r in rows)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=((k + 1) * 0.9, len(rows) * 1.0 + 0.4),
                             dpi=100, squeeze=False)
    for r, row in enumerate(rows):
        axes[r, 0].imshow(as_rgb(images[r], image_shape), vmin=0, vmax=1, interpolation="nearest")
        axes[r, 0].set_title("image" if "source_exemplar" not in row
                             else f"from #{row['source_exemplar']}", fontsize=6)
        for j in range(k):
            ax = axes[r, j + 1]
            if j < len(row["top_exemplars"]):
                n = row["top_exemplars"][j]
                ax.imshow(as_rgb(exemplar_images[n], image_shape), vmin=0, vmax=1,
                          interpolation="nearest")
                lab = "" if row["top_labels"] is None else f" [{row['top_labels'][j]}]"
                ax.set_title(f"{row['top_weights'][j]:.3f}{lab}", fontsize=6)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------ memorisation

def nearest_distances(queries: torch.Tensor, reference: torch.Tensor,
                      block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance of each query [Q, D] to its nearest reference [R, D], and its row."""
    ref = reference.double()
    ref_sq = (ref * ref).sum(1)
    dist, idx = [], []
    for start in range(0, queries.shape[0], block):
        q = queries[start:start + block].double()
        d2 = (q * q).sum(1, keepdim=True) - 2 * q @ ref.t() + ref_sq[None]
        best = d2.min(1)
        dist.append(best.values.clamp_min(0).sqrt())
        idx.append(best.indices)
    return torch.cat(dist).numpy(), torch.cat(idx).numpy()


def memorisation_check(generated: np.ndarray, train: np.ndarray, test: np.ndarray,
                       sources: Optional[np.ndarray] = None) -> tuple[dict, dict]:
    """Generated [G, D], train [N, D], test [T, D] on one pixel scale -> (numbers, raw
    distances). Distances are Euclidean in [0, 1] pixel units."""
    g_d, g_idx = nearest_distances(torch.from_numpy(generated), torch.from_numpy(train))
    t_d, _ = nearest_distances(torch.from_numpy(test), torch.from_numpy(train))
    q = lambda a, p: float(np.quantile(a, p))  # noqa: E731
    numbers = {
        "n_generated": int(len(g_d)), "n_test": int(len(t_d)), "n_train": int(len(train)),
        "generated_to_train": {"median": q(g_d, 0.5), "p05": q(g_d, 0.05), "p01": q(g_d, 0.01),
                               "min": float(g_d.min()), "mean": float(g_d.mean())},
        "test_to_train": {"median": q(t_d, 0.5), "p05": q(t_d, 0.05), "p01": q(t_d, 0.01),
                          "min": float(t_d.min()), "mean": float(t_d.mean())},
        "ratio_of_medians": q(g_d, 0.5) / q(t_d, 0.5),
        # share of generated images closer to the training set than 99% / 95% of test images
        "generated_below_test_p01": float((g_d < q(t_d, 0.01)).mean()),
        "generated_below_test_p05": float((g_d < q(t_d, 0.05)).mean()),
    }
    if sources is not None and (sources >= 0).all():
        numbers["nearest_is_source_exemplar"] = float((g_idx == sources).mean())
    return numbers, {"generated": g_d, "test": t_d}


def memorisation_histogram(dist: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    hi = max(dist["generated"].max(), dist["test"].max())
    bins = np.linspace(0, hi, 50)
    ax.hist(dist["test"], bins=bins, alpha=0.6, label="test -> nearest train", density=True)
    ax.hist(dist["generated"], bins=bins, alpha=0.6, label="generated -> nearest train",
            density=True)
    ax.set_xlabel("Euclidean distance to the nearest training image (pixels in [0, 1])")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------ command line
