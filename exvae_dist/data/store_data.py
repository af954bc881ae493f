"""The splits of an ingested exemplar store (`data.name=store data.store=PATH`).

The store is made by `python -m exvae_dist.ingest`; its held-out validation and test splits
were chosen there. Like MNIST, grey-level data is binarized dynamically for training and
once (data.binarize_seed) for validation and test; a store whose held-out images are all
0 / 255 is static binary data.

The store's fingerprint names its content. `data.store_fingerprint` pins it: null (a new
run) takes the store's and writes it into the config, so the run records which data it
trained on; a set value (a saved run being evaluated) must match, or loading refuses.
"""

from __future__ import annotations

import logging
from pathlib import Path


from ..common.levels import from_bytes
from .splits import DataSplits, binarize_once
from ..common.errors import KnownError

log = logging.getLogger(__name__)


class StoreMismatchError(KnownError, ValueError):
    """The store at data.store is not the one the run was trained on."""


def load_store_splits(cfg, train_in_memory: bool = True) -> DataSplits:
    """cfg: DataConfig with name="store" -> DataSplits (train_x None if not train_in_memory;
    read the training rows with train/store_images.StoreImages instead)."""
    from ..retrieval.store_ingest import read_ingested  # Zarr stays in retrieval/
    if not cfg.store:
        raise ValueError("data.name=store needs data.store=PATH (a store made by "
                         "`python -m exvae_dist.ingest SOURCE PATH`)")
    path = Path(cfg.store).expanduser()
    d = read_ingested(path, train=train_in_memory)
    attrs = d["attrs"]
    fingerprint = attrs["fingerprint"]
    if cfg.store_fingerprint is None:
        cfg.store_fingerprint = fingerprint  # recorded with the run's config
    elif cfg.store_fingerprint != fingerprint:
        raise StoreMismatchError(
            f"data.store={path} holds store {fingerprint}, but this run was trained on store "
            f"{cfg.store_fingerprint}: point data.store at the run's own store (or, to use "
            f"this data on purpose, set data.store_fingerprint={fingerprint})")
    binary = bool(attrs.get("binary", False))
    seed = cfg.binarize_seed

    def flat(x):
        return None if x is None else x.reshape(len(x), -1)

    def grey(x):
        return from_bytes(flat(x)).numpy()

    def held_out(x, stream):
        return (grey(x) if binary else binarize_once(grey(x), seed, stream))

    train_x, train_y = d["train"]
    valid_x, valid_y = d["valid"]
    test_x, test_y = d["test"]
    return DataSplits(
        name="store",
        train_x=None if train_x is None else grey(train_x),
        train_y=train_y, valid_x=held_out(valid_x, 1), valid_y=valid_y,
        test_x=held_out(test_x, 2), test_y=test_y,
        image_shape=tuple(attrs["image_shape"]), dynamic=not binary,
        note=f"exemplar store {path} (fingerprint {fingerprint}, source "
             f"{attrs.get('ingest_source', {}).get('kind')})")


__all__ = ["load_store_splits", "StoreMismatchError"]
