"""Candidate assembly for retrieval augmented training: pure numpy, no index, no Ray.

From the raw neighbour ranking of each batch element (a search over ALL N exemplars), build
the prior's mixture components for the minibatch:

1. drop the element's own id (leave-one-out);
2. keep only exemplars whose per-minibatch coin came up (each is in the subset S with
   probability M/N, so "top-k among S" is "walk the ranking, keep the coin winners");
3. keep the first k survivors of each row;
4. take the union over the batch.

The index is searched k' = query_depth(k, N, M, safety) deep so that k survivors are almost
always found; rows with fewer than k are counted, never padded with made-up neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Candidates:
    """The prior's components for one minibatch.

    ids:      [C] int64, sorted unique exemplar ids (the union of every row's survivors)
    per_row:  [B, k] int64, each row's survivors in ranking order, -1 where fewer than k
    exclude:  [B, C] bool, True where ids[c] is batch element b itself (leave-one-out)
    n_short:  number of rows with fewer than k survivors
    log_norm: [B] float64, log |S minus {i}|: the normalizer of the full subsampled mixture,
              which makes the retrieved prior a lower bound of the subsampled one
    """

    ids: np.ndarray
    per_row: np.ndarray
    exclude: np.ndarray
    n_short: int
    log_norm: np.ndarray


def subset_size(n: int, subsample) -> int:
    """M, the exemplar subset of each step: prior.subsample, or N // 2 (the paper) when None."""
    return min(n, subsample or max(1, n // 2))


def query_depth(k: int, n: int, m: int, safety: float = 2.0) -> int:
    """k' = ceil(safety * k * N / M), capped at N: how deep to search the full index."""
    if not 0 < m <= n:
        raise ValueError(f"subset size M={m} must be in 1..N={n}")
    return int(min(n, math.ceil(safety * k * n / m)))


def draw_coins(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """[N] bool Bernoulli(M/N) coins: the dense form of a subset, for tests and benchmarks
    (training uses retrieval/keyed.coins_for, which never builds an [N] vector)."""
    if m >= n:
        return np.ones(n, dtype=bool)
    return rng.random(n) < (m / n)


def assemble_candidates(neighbour_ids: np.ndarray, batch_ids: np.ndarray,
                        coin: Callable[[np.ndarray], np.ndarray] | np.ndarray, k: int,
                        n: int | None = None, subset_size: int | None = None) -> Candidates:
    """Leave-one-out, coin-subsampled, first-k-survivor candidate set of a minibatch.

    neighbour_ids: [B, k'] int64, each row ranked nearest first over all N exemplars;
                   -1 marks an empty slot (FAISS returns -1 when it finds fewer than k').
    batch_ids:     [B] int64, the exemplar id of each batch element (its own training row).
    coin:          the minibatch's subset S, either as a function ids int64 [R] -> bool [R]
                   (e.g. `lambda ids: keyed.coins_for(ids, step, m, n, seed)`: asked only
                   about the retrieved ids and the batch ids, so a step costs O(B k') whatever
                   N is), with `n` and `subset_size` = |S| given; or as a dense bool [N]
                   vector (n and |S| are then read off it).
    """
    if not callable(coin):
        coins = np.asarray(coin, dtype=bool)
        n, subset_size, coin = coins.shape[0], int(coins.sum()), coins.__getitem__
    if n is None or subset_size is None:
        raise ValueError("a coin function needs n (the number of exemplars) and subset_size")
    neighbour_ids = np.asarray(neighbour_ids)
    batch_ids = np.asarray(batch_ids, dtype=np.int64)
    _check_inputs(neighbour_ids, batch_ids, k, n)
    valid = neighbour_ids >= 0
    asked, inverse = np.unique(neighbour_ids[valid], return_inverse=True)
    keep = np.zeros(neighbour_ids.shape, dtype=bool)
    keep[valid] = np.asarray(coin(asked), dtype=bool)[inverse.reshape(-1)]
    own = np.asarray(coin(batch_ids), dtype=bool)
    return _assemble(neighbour_ids, batch_ids, keep, own, int(subset_size), k)


def _check_inputs(neighbour_ids: np.ndarray, batch_ids: np.ndarray, k: int, n: int) -> None:
    if neighbour_ids.ndim != 2 or neighbour_ids.shape[0] != batch_ids.shape[0]:
        raise ValueError(f"neighbour_ids must be [B, k'] with B={batch_ids.shape[0]} rows, "
                         f"got shape {neighbour_ids.shape}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if neighbour_ids.size and neighbour_ids.max() >= n:
        raise ValueError(f"neighbour id {int(neighbour_ids.max())} out of range for N={n} coins")
    if batch_ids.size and (batch_ids.min() < 0 or batch_ids.max() >= n):
        raise ValueError(f"batch ids must be exemplar rows in 0..{n - 1} (one coin per exemplar), "
                         f"got {int(batch_ids.min())}..{int(batch_ids.max())}")


def _assemble(neighbour_ids: np.ndarray, batch_ids: np.ndarray, in_subset: np.ndarray,
              own_in_subset: np.ndarray, subset_size: int, k: int) -> Candidates:
    """The shared core. in_subset: [B, k'] bool, slot is a valid id whose coin came up;
    own_in_subset: [B] bool, coin of each batch element's own id."""
    keep = in_subset & (neighbour_ids != batch_ids[:, None])
    # rank of each survivor within its row; keep the first k
    keep &= np.cumsum(keep, axis=1) <= k

    b = neighbour_ids.shape[0]
    per_row = np.full((b, k), -1, dtype=np.int64)
    counts = keep.sum(axis=1)
    rows, cols = np.nonzero(keep)
    slot = np.cumsum(keep, axis=1)[rows, cols] - 1
    per_row[rows, slot] = neighbour_ids[rows, cols]

    ids = np.unique(neighbour_ids[keep]).astype(np.int64)
    exclude = ids[None, :] == batch_ids[:, None]
    others = subset_size - own_in_subset.astype(np.int64)
    log_norm = np.log(np.maximum(others, 1)).astype(np.float64)
    return Candidates(ids=ids, per_row=per_row, exclude=exclude,
                      n_short=int((counts < k).sum()), log_norm=log_norm)
