"""A dataset split into train / validation / test, and the binarization of its splits: the
types that the dataset readers (datasets.py) and the exemplar-store reader (store_data.py)
both produce."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class DataSplits:
    """One dataset, split. Images are flattened 28x28, C order, float32.

    train_x: [N, 784] in [0, 1]: grey levels if `dynamic` (binarize each step), else {0, 1}.
    valid_x: [Nv, 784] {0, 1}, binarized once.   test_x: [Nt, 784] {0, 1}, binarized once.
    *_y: [.] int64 class ids (digit / garment class / Omniglot character 0..1622) or None.
    """

    name: str
    train_x: np.ndarray
    train_y: Optional[np.ndarray]
    valid_x: np.ndarray
    valid_y: Optional[np.ndarray]
    test_x: np.ndarray
    test_y: Optional[np.ndarray]
    image_shape: tuple
    dynamic: bool
    note: str = ""


def dynamic_binarize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x: [..., D] grey levels in [0, 1] -> float32 {0, 1} of the same shape, P(1) = x."""
    return (rng.random(x.shape, dtype=np.float32) < x).astype(np.float32)


def binarize_once(x: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """Fixed binarization of an evaluation split; `stream` keeps validation and test
    draws independent of each other for the same seed."""
    return dynamic_binarize(x, np.random.default_rng([seed, stream]))


def take_first(s: DataSplits, cfg) -> DataSplits:
    """Applies data.n_train / n_valid / n_test: the first n of each split."""

    def cut(x, y, n, key):
        if n is None:
            return x, y
        if n <= 0 or n > len(x):
            raise ValueError(f"data.{key}={n}, but {s.name} has {len(x)} images in that split; "
                             f"use 1..{len(x)} or null for all")
        # Copies, so that a small smoke-run split does not pin the full arrays in memory.
        return x[:n].copy(), (None if y is None else y[:n].copy())

    if s.train_x is not None:
        s.train_x, s.train_y = cut(s.train_x, s.train_y, cfg.n_train, "n_train")
    s.valid_x, s.valid_y = cut(s.valid_x, s.valid_y, cfg.n_valid, "n_valid")
    s.test_x, s.test_y = cut(s.test_x, s.test_y, cfg.n_test, "n_test")
    return s
