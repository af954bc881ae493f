"""k-nearest-neighbour classification error on latent vectors (METHOD.md section 4).

Pure torch. Majority vote over the k nearest reference vectors (Euclidean); a tie between
classes goes to the smallest class id, as scikit-learn's KNeighborsClassifier (uniform
weights) breaks it. Distances are float64 so the neighbour order matches a float64 reference.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..core.exact import exact_topk


def nearest_labels(ref: torch.Tensor, ref_y: torch.Tensor, query: torch.Tensor, k: int,
                   block: int = 1024, progress: Optional[str] = None) -> torch.Tensor:
    """Labels of the k nearest reference vectors of each query, nearest first.

    ref: [N, d], ref_y: [N] int, query: [T, d] -> [T, k] int64.
    """
    if ref.shape[0] < k:
        raise ValueError(f"k={k} exceeds the {ref.shape[0]} reference vectors")
    ref = ref.double()
    half_sq = 0.5 * (ref * ref).sum(1)
    out = []
    starts = range(0, query.shape[0], block)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=progress, leave=False, disable=None, dynamic_ncols=True)
    for start in starts:
        q = query[start:start + block].double()
        idx = exact_topk(q, ref, k, block=ref.shape[0], half_sq=half_sq)[1]
        out.append(ref_y[idx])
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.int64)


def vote(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """labels: [T, k] -> the majority label [T]; ties go to the smallest label."""
    counts = torch.zeros(labels.shape[0], n_classes, dtype=torch.int64)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    return counts.argmax(1)  # torch returns the first maximum: the smallest tied label


def knn_errors(ref: torch.Tensor, ref_y: torch.Tensor, query: torch.Tensor,
               query_y: torch.Tensor, ks: Iterable[int] = (3, 5, 7, 9, 11, 13, 15),
               progress: Optional[str] = None) -> dict[int, float]:
    """Test error (fraction in [0, 1]) of k-NN majority vote for each k in ks.

    ref: [N, d] reference vectors, ref_y: [N] labels; query: [T, d], query_y: [T].
    One search with the largest k serves every smaller k.
    """
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"knn ks must be positive integers, got {ks}")
    ref_y = torch.as_tensor(ref_y, dtype=torch.int64)
    query_y = torch.as_tensor(query_y, dtype=torch.int64)
    n_classes = int(max(ref_y.max().item(), query_y.max().item())) + 1
    labels = nearest_labels(ref, ref_y, query, ks[-1], progress=progress)
    return {k: (vote(labels[:, :k], n_classes) != query_y).double().mean().item() for k in ks}
