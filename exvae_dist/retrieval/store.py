"""The exemplar store: exemplar images and versioned latent tables in one Zarr v3 group.

Layout of a store at `path`:

    path/                     Zarr group; attrs: format, n, latent_dim, chunk_rows, image_shape
      images                  uint8 [N, ...], chunked by `chunk_rows` rows
      latents/v000001         float32 [N, d], chunked by `chunk_rows` rows; attrs["complete"]
      latents/v000002         ...

A latent version is visible to readers only once it is complete: every chunk written and
attrs["complete"] set by one coordinator (`mark_complete`, which checks the chunks first).
Writers in several processes each own whole chunks (`row_range(w, W)` hands writer w its
chunk-aligned rows): Zarr loses data when two processes write parts of the same chunk or
shard. Metadata (version creation, completion marks, pruning) is written by one coordinator
only; LocalStore writes each metadata document atomically (temp file + rename).

Every chunk (images and latents) carries a CRC32C checksum (Zarr's `Crc32cCodec`), so a
torn or overwritten chunk is an error, never a different model. A version counts as complete
only when it is marked complete AND every chunk reads back and verifies (checked once per
version and process); an incomplete, unreadable or corrupt version is skipped with a warning
that says why, never used, and the newest good one is used instead.

Version numbers are claimed atomically (`os.mkdir` of the version's folder, which fails when
it exists), so two writers can never share a latent table: a writer that finds a number taken
takes the next free one (`claim_version`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from ..common.errors import KnownError

log = logging.getLogger(__name__)

FORMAT = "exvae-exemplar-store/1"
DEFAULT_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class ImageLayout:
    """How the images array is cut on disk.

    chunk_rows: rows per chunk, the unit one read decompresses (None = the store's chunk_rows).
    shard_rows: rows per shard file holding many chunks (Zarr's sharding codec); None = no
                shards, one file per chunk. Writers must own whole shards.
    compress:   Blosc-zstd chunks (True) or raw bytes (False). Raw unsharded chunks are
                plain C-order row files that retrieval/store_rows.py reads row by row with
                pread, without Zarr's per-chunk cost (bench/README.md, "Exemplar store
                layout": ~1 ms per chunk touched, and a random row touches its own chunk).
    """

    chunk_rows: Optional[int] = None
    shard_rows: Optional[int] = None
    compress: bool = True


# Measured best for a few thousand random rows per step (bench/bench_store_layout.py):
# uncompressed 8192-row chunk files (784 bytes a row on disk), read by pread.
RANDOM_READ_LAYOUT = ImageLayout(chunk_rows=8192, compress=False)


def create_images_array(root: zarr.Group, shape: tuple[int, ...], chunk_rows: int,
                        layout: Optional[ImageLayout] = None) -> zarr.Array:
    """The uint8 images array of a new store (shared by create and the streaming ingest)."""
    layout = layout or ImageLayout()
    inner = layout.chunk_rows or chunk_rows
    shards = None
    if layout.shard_rows is not None:
        if layout.shard_rows % inner:
            raise StoreError(f"shard_rows={layout.shard_rows} must be a multiple of "
                             f"chunk_rows={inner}")
        shards = (layout.shard_rows, *shape[1:])
    # CRC32C after compression: a torn or zeroed chunk is an error, never other images
    compressors = ([BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]
                   if layout.compress else []) + [Crc32cCodec()]
    # every chunk file exists, even an all-zero one: raw readers and completion checks rely on it
    return root.create_array(
        "images", shape=shape, dtype=np.uint8, chunks=(inner, *shape[1:]), shards=shards,
        compressors=compressors, config={"write_empty_chunks": True})


class StoreError(KnownError, ValueError):
    """A store or latent version that cannot be used as asked; the message says why."""


class VersionClaimed(StoreError):
    """A latent version number that another writer has already claimed."""


def default_owner() -> str:
    """Who writes a version: host and process id (recorded in the table's attributes)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _version_name(version: int) -> str:
    return f"v{version:06d}"


def chunk_aligned_range(worker: int, n_workers: int, n: int, chunk_rows: int) -> tuple[int, int]:
    """Rows [start, stop) of writer `worker` of `n_workers`, on chunk boundaries.

    Whole chunks are dealt out as evenly as possible; the last chunk may be short (it ends
    at N). A writer can get an empty range when there are fewer chunks than writers.
    """
    if not 0 <= worker < n_workers:
        raise ValueError(f"writer {worker} out of range for {n_workers} writers")
    n_chunks = -(-n // chunk_rows)
    first = (n_chunks * worker) // n_workers
    last = (n_chunks * (worker + 1)) // n_workers
    return min(first * chunk_rows, n), min(last * chunk_rows, n)


class ExemplarStore:
    """Exemplar images and versioned latent tables on disk.

    Open an existing store with `ExemplarStore(path)`; make one with
    `ExemplarStore.create(path, images, latent_dim)`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not (self.path / "zarr.json").is_file():
            raise FileNotFoundError(
                f"no exemplar store at {self.path}: create it with "
                f"ExemplarStore.create({str(self.path)!r}, images, latent_dim) "
                f"(or fix index.store_path)")
        # read-only where we may not write (a shared, published store): readers still work
        mode = "r+" if os.access(self.path, os.W_OK) else "r"
        self._root = zarr.open_group(str(self.path), mode=mode)
        self._warned: set[tuple[int, str]] = set()
        self._verified: set[int] = set()  # complete versions whose every chunk verified
        attrs = dict(self._root.attrs)
        if attrs.get("ingest_state") == "writing":  # retrieval/store_ingest.py
            raise StoreError(f"{self.path} is a half-written store (an ingest was interrupted): "
                             f"re-run the same `python -m exvae_dist.ingest` command to resume "
                             f"it, or delete {self.path}")
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{self.path} is a Zarr group but not an exemplar store "
                             f"(format={attrs.get('format')!r}, expected {FORMAT!r})")
        self.n: int = int(attrs["n"])
        self.latent_dim: int = int(attrs["latent_dim"])
        self.chunk_rows: int = int(attrs["chunk_rows"])
        self.image_shape: tuple[int, ...] = tuple(attrs["image_shape"])
        images = self._root["images"]
        if images.shape != (self.n, *self.image_shape) or images.dtype != np.uint8:
            raise StoreError(f"{self.path}/images is {images.shape} {images.dtype}, expected "
                             f"{(self.n, *self.image_shape)} uint8: the store is damaged; "
                             f"re-create it with ExemplarStore.create")

    # -- creation --------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, images: np.ndarray, latent_dim: int,
               chunk_rows: int = DEFAULT_CHUNK_ROWS, overwrite: bool = False,
               image_layout: Optional[ImageLayout] = None) -> "ExemplarStore":
        """Writes `images` (uint8 [N, ...]) into a new store at `path` and opens it.

        Refuses to replace an existing store unless overwrite=True. image_layout: how the
        images are chunked (default: chunk_rows rows per chunk, unsharded; pass
        RANDOM_READ_LAYOUT when workers read random rows from the store).
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim < 2 or images.shape[0] == 0:
            raise StoreError(f"images must be a non-empty uint8 array [N, ...], got "
                             f"{images.shape} {images.dtype} (convert with .astype(np.uint8))")
        if latent_dim <= 0 or chunk_rows <= 0:
            raise StoreError(f"latent_dim ({latent_dim}) and chunk_rows ({chunk_rows}) "
                             f"must be positive")
        path = Path(path).expanduser()
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists: open it with ExemplarStore(path) "
                                  f"or pass overwrite=True to replace it")
        root = zarr.open_group(str(path), mode="w")
        arr = create_images_array(root, images.shape, chunk_rows, image_layout)
        arr[...] = images
        root.create_group("latents")
        # the format attributes go last: a store is only recognised once its images exist
        root.attrs.update({"format": FORMAT, "n": int(images.shape[0]),
                           "latent_dim": int(latent_dim), "chunk_rows": int(chunk_rows),
                           "image_shape": list(images.shape[1:])})
        return cls(path)

    # -- images ----------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        """The store's attributes (format, shapes; an ingested store's fingerprint and source)."""
        return dict(self._root.attrs)

    @property
    def images_array(self) -> zarr.Array:
        """The Zarr array of the images, for readers that go below Zarr (store_rows.py reads
        its chunk layout); everyone else reads rows with `images`."""
        return self._root["images"]

    def held_out(self, split: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(uint8 images, labels or None) of an ingested store's held-out split ("valid",
        "test"); the training rows are `images` and `labels`."""
        if split not in self._root:
            raise StoreError(f"{self.path} has no held-out split {split!r}: it was not made by "
                             f"`python -m exvae_dist.ingest`")
        group = self._root[split]
        return group["images"][...], group["labels"][...] if "labels" in group else None

    def labels(self) -> Optional[np.ndarray]:
        """The training rows' labels, or None when the store has none."""
        return self._root["labels"][...] if "labels" in self._root else None

    def images(self, rows: Optional[np.ndarray | slice] = None) -> np.ndarray:
        """uint8 [len(rows), ...] exemplar images (all N when rows is None)."""
        arr = self._root["images"]
        if rows is not None and not isinstance(rows, slice):
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= self.n):
                raise IndexError(f"exemplar rows must be in 0..{self.n - 1}")
        try:
            if rows is None:
                return arr[...]
            if isinstance(rows, slice):
                return arr[rows]
            # Zarr orthogonal indexing wants sorted unique rows; undo the sort afterwards.
            uniq, inverse = np.unique(rows, return_inverse=True)
            return arr.get_orthogonal_selection((uniq,))[inverse]
        except ValueError as err:  # Crc32cCodec: "Stored and computed checksum do not match"
            raise StoreError(f"the exemplar images of {self.path} are corrupt ({err}): "
                             f"{self.rebuild_advice()}") from err

    def rebuild_advice(self) -> str:
        """How to get good images back: re-run the ingest that wrote the store (what an
        ingested store's ingest_source records), else ExemplarStore.create."""
        source = self._root.attrs.get("ingest_source")
        if source is not None:
            return (f"delete {self.path} and re-run the `python -m exvae_dist.ingest` command "
                    f"that wrote it (source: {source})")
        return "re-create the store with ExemplarStore.create(..., overwrite=True)"

    # -- writing a latent version ----------------------------------------------------------

    def row_range(self, worker: int, n_workers: int) -> tuple[int, int]:
        """Chunk-aligned rows [start, stop) that writer `worker` of `n_workers` owns."""
        return chunk_aligned_range(worker, n_workers, self.n, self.chunk_rows)

    def begin_version(self, version: int, owner: Optional[str] = None) -> None:
        """Claims and creates latent table `version` (coordinator only, before any writer).

        The claim is atomic: the version's folder is made with os.mkdir, which fails when it
        exists, so two writers never share a table. An incomplete table is reused only by
        the owner that claimed it (default: this host and process); another writer's, or a
        complete (immutable) one, is refused with VersionClaimed / StoreError: take the next
        free number with `claim_version`.
        """
        if version <= 0:
            raise StoreError(f"versions are positive integers, got {version}")
        owner = owner or default_owner()
        name = _version_name(version)
        group = self._root["latents"]
        if name in group:
            arr = group[name]
            if arr.attrs.get("complete"):
                raise StoreError(f"latent version {version} in {self.path} is already complete; "
                                 f"versions are immutable, write version {version + 1} instead")
            claimed = arr.attrs.get("owner")
            if (claimed == owner and arr.shape == (self.n, self.latent_dim)
                    and arr.dtype == np.float32):
                return
            raise VersionClaimed(f"latent version {version} of {self.path} is already claimed "
                                 f"by {claimed!r} (this writer is {owner!r}): two writers must "
                                 f"never share a table; take a free number with "
                                 f"claim_version({version + 1})")
        try:
            os.mkdir(self.path / "latents" / name)  # the atomic claim
        except FileExistsError:
            raise VersionClaimed(f"latent version {version} of {self.path} was claimed by "
                                 f"another writer a moment ago; take a free number with "
                                 f"claim_version({version + 1})") from None
        # NaN fill: a chunk nobody wrote reads as NaN, never as plausible zeros.
        group.create_array(name, shape=(self.n, self.latent_dim), dtype=np.float32,
                           chunks=(self.chunk_rows, self.latent_dim), fill_value=np.nan,
                           compressors=[Crc32cCodec()], config={"write_empty_chunks": True},
                           attributes={"complete": False, "version": int(version),
                                       "owner": owner})

    def claim_version(self, at_least: int = 1, owner: Optional[str] = None) -> int:
        """Claims the lowest free version >= at_least and above every existing one; returns it.

        Retries with the next number when another writer claims one first.
        """
        version = max(at_least, max(self.versions(), default=0) + 1)
        for _ in range(1000):
            try:
                self.begin_version(version, owner)
                return version
            except VersionClaimed:
                version += 1
        raise StoreError(f"could not claim a latent version of {self.path} after 1000 tries")

    def write_rows(self, version: int, start: int, latents: np.ndarray) -> None:
        """Writes latents [R, d] into rows [start, start + R) of version `version`.

        The range must cover whole chunks (start and end on multiples of chunk_rows, or
        end == N), so that concurrent writers never share a chunk; use `row_range`.
        """
        latents = np.asarray(latents)
        stop = start + latents.shape[0] if latents.ndim else start
        if latents.ndim != 2 or latents.shape[1] != self.latent_dim:
            raise StoreError(f"latents must be [R, {self.latent_dim}], got {latents.shape}")
        if start < 0 or stop > self.n:
            raise StoreError(f"rows [{start}, {stop}) outside 0..{self.n}")
        if start % self.chunk_rows or (stop % self.chunk_rows and stop != self.n):
            raise StoreError(
                f"rows [{start}, {stop}) are not chunk-aligned (chunk_rows={self.chunk_rows}): "
                f"two writers sharing a chunk lose data; take ranges from store.row_range(w, W)")
        if not np.isfinite(latents).all():
            raise StoreError(f"latents for rows [{start}, {stop}) contain NaN or inf")
        arr = self._version_array(version)
        if arr.attrs.get("complete"):
            raise StoreError(f"latent version {version} is complete and immutable")
        arr[start:stop] = latents.astype(np.float32, copy=False)

    def mark_complete(self, version: int, keep: Optional[int] = None) -> None:
        """Makes `version` visible (coordinator only, after every writer finished).

        Checks that every chunk was written first. With `keep`, prunes to the newest
        `keep` complete versions afterwards.
        """
        arr = self._version_array(version)
        problem = self._check(arr, require_complete=False) or self._verify(arr)
        if problem:
            raise StoreError(f"cannot mark latent version {version} complete: {problem}")
        self._verified.add(version)
        arr.attrs.update({"complete": True, "completed_at": time.time()})
        log.info("latent version %d of %s complete", version, self.path)
        if keep is not None:
            self.prune(keep)

    # -- reading ---------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Every latent version present, complete or not, ascending."""
        out = []
        for name in self._root["latents"].array_keys():
            if name.startswith("v") and name[1:].isdigit():
                out.append(int(name[1:]))
        return sorted(out)

    def complete_versions(self) -> list[int]:
        """Versions that are complete and valid, ascending; others are skipped with a warning."""
        return [v for v in self.versions() if self._usable(v)]

    def latest_complete(self) -> Optional[int]:
        """The newest complete version whose every chunk verifies, or None (corrupt newer
        versions are skipped with a warning: the newest good one is used)."""
        for v in reversed(self.versions()):
            if self._usable(v):
                return v
        return None

    def read_latents(self, version: int) -> np.ndarray:
        """float32 [N, d]: the latent table of a complete version (StoreError otherwise)."""
        arr = self._version_array(version)
        problem = self._check(arr, require_complete=True)
        if problem:
            raise StoreError(f"latent version {version} of {self.path} is unusable: {problem}")
        try:
            table = arr[...]
        except Exception as err:  # a torn chunk, a checksum mismatch: the store's problem
            self._verified.discard(version)
            raise StoreError(f"latent version {version} of {self.path} is corrupt: "
                             f"reading it failed with {type(err).__name__}: {err}") from err
        if not np.isfinite(table).all():
            raise StoreError(f"latent version {version} of {self.path} is corrupt: "
                             f"it holds NaN/inf (unwritten rows?)")
        return table

    def read_latent_rows(self, version: int, start: int, stop: int) -> np.ndarray:
        """float32 [stop - start, d]: rows [start, stop) of a complete version (an index
        shard's block), with read_latents' checks."""
        arr = self._version_array(version)
        problem = self._check(arr, require_complete=True)
        if problem:
            raise StoreError(f"latent version {version} of {self.path} is unusable: {problem}")
        block = arr[start:stop]
        if not np.isfinite(block).all():
            raise StoreError(f"latent version {version} of {self.path} is corrupt: rows "
                             f"[{start}, {stop}) hold NaN/inf")
        return block

    def prune(self, keep: int) -> list[int]:
        """Deletes all but the newest `keep` complete versions; returns the deleted ones.

        Incomplete versions older than the newest complete one are abandoned refreshes and
        go too; newer incomplete ones may be in progress and stay.
        """
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        complete = self.complete_versions()
        if not complete:
            return []
        keep_set = set(complete[-keep:])
        newest = complete[-1]
        doomed = [v for v in self.versions() if v not in keep_set and v < newest]
        group = self._root["latents"]
        for v in doomed:
            del group[_version_name(v)]
        if doomed:
            log.info("pruned latent versions %s of %s", doomed, self.path)
        return doomed

    # -- internals -------------------------------------------------------------------------

    def _version_array(self, version: int) -> zarr.Array:
        name = _version_name(version)
        group = self._root["latents"]
        if name not in group:
            raise StoreError(f"latent version {version} does not exist in {self.path} "
                             f"(versions: {self.versions()}); call begin_version({version}) first")
        return group[name]

    def _check(self, arr: zarr.Array, require_complete: bool) -> Optional[str]:
        """None if the table is usable, else what is wrong with it."""
        if arr.shape != (self.n, self.latent_dim) or arr.dtype != np.float32:
            return (f"shape {arr.shape} {arr.dtype}, expected ({self.n}, {self.latent_dim}) "
                    f"float32")
        if require_complete and not arr.attrs.get("complete"):
            return "not marked complete (a refresh still writing, or one that crashed)"
        written, total = arr.nchunks_initialized, arr.nchunks
        if written != total:
            return f"only {written} of {total} chunks written"
        return None

    def _verify(self, arr: zarr.Array) -> Optional[str]:
        """None if every chunk reads, passes its CRC32C check and holds finite values."""
        step = self.chunk_rows * max(1, (64 << 20) // (4 * self.latent_dim * self.chunk_rows))
        for start in range(0, self.n, step):  # ~64 MB at a time: bounded memory
            try:
                block = arr[start:start + step]
            except Exception as err:  # truncated chunk, checksum mismatch, bad codec data
                return (f"rows from {start} do not read back ({type(err).__name__}: {err}): "
                        f"the table is corrupt")
            if not np.isfinite(block).all():
                return f"rows from {start} hold NaN/inf (unwritten or corrupt rows)"
        return None

    def _usable(self, version: int) -> bool:
        try:
            arr = self._version_array(version)
            problem = self._check(arr, require_complete=True)
            if problem is None and version not in self._verified:
                problem = self._verify(arr)
                if problem is None:
                    self._verified.add(version)
        except Exception as err:  # unreadable metadata counts as corrupt
            problem = f"metadata unreadable ({type(err).__name__}: {err})"
        if problem:
            # once per (version, problem): pollers ask often while a refresh is writing
            if (version, problem) not in self._warned:
                self._warned.add((version, problem))
                log.warning("skipping latent version %d of %s: %s", version, self.path, problem)
            return False
        return True
