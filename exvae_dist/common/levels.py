"""Grey levels: images are kept as uint8 bytes (level k is k/255: the store, exemplar sets,
generated .npz files) and computed on as float32 in [0, 1]. The one conversion each way.

For MNIST and Fashion-MNIST (grey = byte / 255) and binarized MNIST ({0, 1}) the round trip
is lossless, so an image read back from bytes is bit-identical to the dataset reader's.
"""

from __future__ import annotations

import numpy as np
import torch


def to_bytes(x) -> np.ndarray:
    """Images as uint8 levels: uint8 as is; floats in [0, 1] -> rint(255 x), clipped to
    [0, 1] first (a caller that must refuse values outside checks them itself)."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def from_bytes(b) -> torch.Tensor:
    """uint8 levels -> float32 in [0, 1], as a tensor (`.numpy()` for an array).

    A correctly rounded float32 division, bit-identical to np.float32(b) / np.float32(255),
    the readers' form (a 256-entry lookup table gives the same values, but its gather took
    13 ms per RAT step)."""
    if isinstance(b, np.ndarray) and not b.flags.writeable:  # e.g. from the object store
        b = b.copy()
    return torch.as_tensor(b).float().div_(255)


def exact_levels(x: np.ndarray):
    """uint8 levels of float images in [0, 1] that are exactly 255 levels (the round trip
    gives them back bit for bit: every dataset here), else None."""
    b = to_bytes(x)
    return b if np.array_equal(from_bytes(b).numpy(), x) else None
