"""Exemplar images read from the store by id: what a worker holds instead of all N images.

`StoreImages` has StoredImages' interface (`images[ids]`, `images[a:b]` -> float32 [len, D]
in [0, 1], `len(images)`, `.shape`) with memory bounded by `cache_bytes` whatever N is: a
store whose images fit in the bound is read into memory once (MNIST: 39 MB; a pread per row
would cost a few ms per step for nothing), a bigger one is read by id per step
(retrieval/store_rows.py: pread for the raw layout, an LRU of chunks otherwise).
"""

from __future__ import annotations

import numpy as np
import torch

from ..retrieval.store import ExemplarStore
from ..retrieval.store_rows import open_row_reader
from ..common.levels import from_bytes


class StoreImages:
    """The store's images [N, D] as float32 rows: all in memory when N x D bytes fit in
    cache_bytes, else read on demand (cache_bytes then bounds the chunk cache of compressed
    layouts; the raw layout caches nothing in the process, the OS page cache does)."""

    def __init__(self, store: ExemplarStore, cache_bytes: int = 512 << 20):
        self.store = store
        self.n = store.n
        self.dim = int(np.prod(store.image_shape))
        self.reader = open_row_reader(store, cache_bytes)
        self.resident: np.ndarray | None = None  # uint8 [N, D] when it fits the bound
        if self.n * self.dim <= cache_bytes:
            self.resident = self.reader.read_range(0, self.n).reshape(self.n, self.dim)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.dim))

    def __len__(self) -> int:
        return self.n

    def bytes(self, rows) -> np.ndarray:
        """uint8 [len, D] rows (ids: int array or tensor; or a slice with step 1)."""
        if self.resident is not None:
            if isinstance(rows, torch.Tensor):
                rows = rows.cpu().numpy()
            return self.resident[rows]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.n)
            if step != 1:
                raise IndexError("StoreImages slices must have step 1")
            out = self.reader.read_range(start, stop)
        else:
            if isinstance(rows, torch.Tensor):
                rows = rows.cpu().numpy()
            out = self.reader.read(np.asarray(rows, dtype=np.int64))
        return out.reshape(len(out), self.dim)

    def __getitem__(self, rows) -> torch.Tensor:
        return from_bytes(self.bytes(rows))
