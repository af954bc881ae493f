"""Writing an exemplar store block by block (resumable), and reading an ingested store back.

An ingested store is an ExemplarStore (retrieval/store.py) with, in the same Zarr group:

    images            uint8 [N, ...] training exemplars, RANDOM_READ_LAYOUT (raw chunks)
    labels            int64 [N]            (when the source has labels)
    valid/images, valid/labels, test/images, test/labels   the held-out splits
    ingest/marks      uint8 [blocks, 16]   a digest per written block: its completion mark
    attrs: ingest_state ("writing" | "complete"), ingest_source (what was read), fingerprint

While `ingest_state` is "writing" the group has no `format` attribute, so ExemplarStore
refuses to open it (a half-written store says so and how to resume). Each block (one
chunk of rows, owned by this one writer) is written, then its mark: a mark is only ever
set on a block whose images and labels are on disk (Zarr's LocalStore writes each chunk
file by temp file + rename). A resumed ingest skips marked blocks and must read the same
source (ingest_source must match). The fingerprint, a hash of every block's digest and of
the held-out splits, names the store's content: a run records it and evaluation refuses
a store whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import zarr

from .store import (FORMAT, RANDOM_READ_LAYOUT, ExemplarStore, ImageLayout, StoreError,
                    create_images_array)

log = logging.getLogger(__name__)

WRITING, COMPLETE = "writing", "complete"


def block_digest(images: np.ndarray, labels: Optional[np.ndarray]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(images).tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.digest()


class StoreBuilder:
    """Creates (or resumes) a store of n images, written one block of `block_rows` at a time.

    source: a JSON-able description of what is being ingested; a resume must match it.
    """

    def __init__(self, path: str | Path, n: int, image_shape: tuple[int, ...], *,
                 labelled: bool, source: dict, latent_dim: int = 40, block_rows: int = 8192,
                 layout: ImageLayout = RANDOM_READ_LAYOUT):
        self.path = Path(path).expanduser()
        self.n, self.image_shape, self.block_rows = int(n), tuple(image_shape), int(block_rows)
        self.labelled = labelled
        self.n_blocks = -(-self.n // self.block_rows)
        if (self.path / "zarr.json").is_file():
            self.root = zarr.open_group(str(self.path), mode="r+")
            self._check_resumable(source)
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise FileExistsError(f"{self.path} exists and is not a store: choose another "
                                      f"STORE path or remove it")
            self.root = zarr.open_group(str(self.path), mode="w")
            self.root.attrs.update({"ingest_state": WRITING, "ingest_source": source,
                                    "n": self.n, "latent_dim": int(latent_dim),
                                    "chunk_rows": self.block_rows,
                                    "image_shape": list(self.image_shape)})
            create_images_array(self.root, (self.n, *self.image_shape), self.block_rows,
                                ImageLayout(chunk_rows=layout.chunk_rows or self.block_rows,
                                            shard_rows=layout.shard_rows,
                                            compress=layout.compress))
            if labelled:
                self.root.create_array("labels", shape=(self.n,), dtype=np.int64,
                                       chunks=(self.block_rows,), compressors=None)
            self.root.create_array("ingest/marks", shape=(self.n_blocks, 16), dtype=np.uint8,
                                   chunks=(1, 16), compressors=None, fill_value=0)
            self.root.create_group("latents")
        self._marks = self.root["ingest/marks"]

    def _check_resumable(self, source: dict) -> None:
        attrs = dict(self.root.attrs)
        if attrs.get("ingest_state") == COMPLETE or attrs.get("format") == FORMAT:
            raise FileExistsError(f"{self.path} is already a complete store: open it, or choose "
                                  f"another STORE path to ingest again")
        if attrs.get("ingest_state") != WRITING:
            raise StoreError(f"{self.path} is a Zarr group but not an ingest in progress; "
                             f"choose another STORE path")
        if attrs.get("ingest_source") != source or attrs.get("n") != self.n \
                or tuple(attrs.get("image_shape", ())) != self.image_shape:
            raise StoreError(f"{self.path} is a half-written ingest of another source "
                             f"({attrs.get('ingest_source')}, n={attrs.get('n')}); this "
                             f"one is {source}, n={self.n}. Delete {self.path} to start over, "
                             f"or re-run the original command to resume it")

    def done_blocks(self) -> np.ndarray:
        """bool [blocks]: which blocks carry a completion mark."""
        return self._marks[...].any(axis=1)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(self.n, start + self.block_rows)

    def write_block(self, block: int, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
        start, stop = self.block_range(block)
        if images.dtype != np.uint8 or images.shape != (stop - start, *self.image_shape):
            raise StoreError(f"block {block} must be uint8 {(stop - start, *self.image_shape)}, "
                             f"got {images.dtype} {images.shape}")
        self.root["images"][start:stop] = images
        if self.labelled:
            if labels is None or labels.shape != (stop - start,):
                raise StoreError(f"block {block} needs {stop - start} labels")
            self.root["labels"][start:stop] = labels.astype(np.int64)
        self._marks[block] = np.frombuffer(block_digest(images, labels), np.uint8)

    def finish(self, splits: dict[str, tuple[np.ndarray, Optional[np.ndarray]]],
               extra_attrs: dict) -> str:
        """Writes the held-out splits, checks every block is marked, opens the store.

        splits: {"valid": (images uint8 [Nv, ...], labels or None), "test": (...)}.
        Returns the fingerprint.
        """
        done = self.done_blocks()
        if not done.all():
            raise StoreError(f"{int((~done).sum())} of {self.n_blocks} blocks of {self.path} "
                             f"are not written; re-run the ingest to finish them")
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.n, self.image_shape)).encode())
        h.update(np.ascontiguousarray(self._marks[...]).tobytes())
        for name in ("valid", "test"):
            images, labels = splits[name]
            if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
                raise StoreError(f"{name} split must be uint8 [n, {self.image_shape}], got "
                                 f"{images.dtype} {images.shape}")
            if name in self.root:
                del self.root[name]
            group = self.root.create_group(name)
            group.create_array("images", data=np.ascontiguousarray(images), chunks=images.shape)
            if labels is not None:
                group.create_array("labels", data=np.asarray(labels, dtype=np.int64))
            h.update(block_digest(images, labels))
        fingerprint = h.hexdigest()
        # the format attribute last: only now does ExemplarStore open the group
        self.root.attrs.update({**extra_attrs, "fingerprint": fingerprint,
                                "ingest_state": COMPLETE, "format": FORMAT})
        return fingerprint


def _ingested_attrs(store: ExemplarStore) -> dict:
    attrs = store.attrs
    if "fingerprint" not in attrs:
        raise StoreError(f"{store.path} is an exemplar store but was not made by "
                         f"`python -m exvae_dist.ingest` (no fingerprint / held-out splits)")
    return attrs


def ingested_fingerprint(path: str | Path) -> str:
    """The content fingerprint of the ingested store at `path`, from its attributes only
    (cheap); StoreError / FileNotFoundError for a missing, half-written or foreign store."""
    return _ingested_attrs(ExemplarStore(Path(path).expanduser()))["fingerprint"]


def read_ingested(path: str | Path, train: bool = True) -> dict:
    """The splits of an ingested store: {"train": (uint8 [N, ...] or None, labels or None),
    "valid": (...), "test": (...), "attrs": dict}. train=False leaves the N training images
    on disk (read them with train/store_images.StoreImages)."""
    store = ExemplarStore(path)  # refuses a half-written store
    attrs = _ingested_attrs(store)  # refuses a store that ingest did not make
    out = {"attrs": attrs, **{split: store.held_out(split) for split in ("valid", "test")}}
    out["train"] = (store.images() if train else None, store.labels())
    return out


def open_zarr_images(path: str | Path) -> zarr.Array:
    """An existing Zarr array (a source to ingest), or a clear error."""
    try:
        node = zarr.open(str(Path(path).expanduser()), mode="r")
    except Exception as err:
        raise ValueError(f"{path} is not a readable Zarr array ({type(err).__name__}: {err})") \
            from None
    if not isinstance(node, zarr.Array):
        keys = ", ".join(node.keys()) if hasattr(node, "keys") else "?"
        raise ValueError(f"{path} is a Zarr group, not an array: give the array inside it "
                         f"(members: {keys}), e.g. {path}/images")
    return node


__all__ = ["StoreBuilder", "read_ingested", "open_zarr_images", "block_digest"]
