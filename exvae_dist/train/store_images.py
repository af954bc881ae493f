"""Exemplar images read from the store by id: what a worker holds instead of all N images.

`StoreImages` has StoredImages' interface (`images[ids]`, `images[a:b]` -> float32 [len, D]
in [0, 1], `len(images)`, `.shape`) but keeps only a bounded cache (retrieval/store_rows.py:
pread for the raw layout, an LRU of chunks otherwise), so a worker's memory does not grow
with N. Swap it in where a worker does `StoredImages.from_store(store)`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..retrieval.store import ExemplarStore
from ..retrieval.store_rows import open_row_reader
from .exemplars import from_bytes


class StoreImages:
    """The store's images [N, D] as float32 rows, read on demand. cache_bytes bounds the
    chunk cache of compressed layouts (the raw layout caches nothing in the process)."""

    def __init__(self, store: ExemplarStore, cache_bytes: int = 64 << 20):
        self.store = store
        self.reader = open_row_reader(store, cache_bytes)
        self.n = store.n
        self.dim = int(np.prod(store.image_shape))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.dim))

    def __len__(self) -> int:
        return self.n

    def bytes(self, rows) -> np.ndarray:
        """uint8 [len, D] rows (ids: int array or tensor; or a slice with step 1)."""
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
