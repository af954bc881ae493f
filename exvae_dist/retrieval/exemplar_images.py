"""The exemplars of a distributed run: the training images, kept in the exemplar store.

The driver ingests the training images into the store once (`ensure_store`); each worker
reads them back (`store_images.StoreImages`) for its training batches, the candidates it re-encodes and
its rows of the refresh pass. Workers therefore need the store, not the dataset files.

Images are stored as uint8 grey levels (common/levels.py). For MNIST and Fashion-MNIST (grey
= byte / 255) and binarized MNIST ({0, 1}) this is lossless, so both trainers see
bit-identical images; for Omniglot's 28x28 area-averaged images it rounds to 1/255 (a warning
says how much).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np

from ..common.levels import from_bytes, to_bytes
from .store import ExemplarStore

log = logging.getLogger(__name__)


def default_chunk_rows(n: int) -> int:
    """Store rows per chunk: at most 8192, but at least 16 chunks for small sets, so that
    several workers each own whole chunks of the refresh even on a smoke run."""
    return int(min(8192, max(64, math.ceil(n / 16))))


def ensure_store(path: str | Path, train_x: np.ndarray, image_shape, latent_dim: int,
                 chunk_rows: Optional[int] = None) -> ExemplarStore:
    """Opens the exemplar store at `path`, creating it from train_x [N, D] if absent.

    An existing store must hold the same exemplars (count, shape, latent size and a sample of
    rows); otherwise a ValueError says how to start afresh.
    """
    path = Path(path)
    images = to_bytes(train_x).reshape(len(train_x), *image_shape)
    lossy = float(np.abs(from_bytes(images).reshape(len(train_x), -1).numpy() - train_x).max())
    if lossy > 0:
        log.warning("the store keeps exemplar images as bytes: rounding changes pixels by up "
                    "to %.4f (grey levels that are not multiples of 1/255)", lossy)
    if not (path / "zarr.json").is_file():
        if path.exists() and any(path.iterdir()):
            raise ValueError(f"{path} exists but is not an exemplar store: remove it or set "
                             f"index.store_path to another folder")
        log.info("ingesting %d exemplar images into %s", len(images), path)
        return ExemplarStore.create(path, images, latent_dim,
                                    chunk_rows=chunk_rows or default_chunk_rows(len(images)),
                                    overwrite=path.exists())
    store = ExemplarStore(path)
    problem = None
    if store.n != len(images) or tuple(store.image_shape) != tuple(images.shape[1:]):
        problem = (f"it holds {store.n} images of shape {tuple(store.image_shape)}, the "
                   f"training set has {len(images)} of shape {tuple(images.shape[1:])}")
    elif store.latent_dim != latent_dim:
        problem = f"its latent size is {store.latent_dim}, the model's is {latent_dim}"
    else:
        rows = np.unique(np.random.default_rng(0).integers(0, store.n, size=min(64, store.n)))
        if not np.array_equal(store.images(rows), images[rows]):
            problem = "its images differ from the training set's"
    if problem:
        raise ValueError(f"the exemplar store {path} does not belong to this run: {problem}. "
                         f"Delete it (it is rebuilt from the data), or use another train.name "
                         f"or index.store_path")
    return store


def open_exemplar_store(path: str | Path, latent_dim: int) -> ExemplarStore:
    """An existing store (made by `python -m exvae_dist.ingest`) as a run's exemplar store:
    its images are the exemplars; the run writes its latent versions into it."""
    if not (Path(path) / "zarr.json").is_file():
        raise ValueError(f"{path} is not an exemplar store: make one with "
                         f"`python -m exvae_dist.ingest SOURCE {path}`")
    store = ExemplarStore(path)
    if store.latent_dim != latent_dim:
        raise ValueError(f"the store {path} keeps latents of size {store.latent_dim}, the "
                         f"model's are {latent_dim}: set model.z_dim={store.latent_dim}, or "
                         f"re-ingest with --latent-dim {latent_dim}")
    return store
