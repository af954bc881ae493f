"""Reading exemplar image rows by id from the store, with memory bounded whatever N is.

    rows = open_row_reader(store, cache_bytes=64 << 20)
    rows.read(ids)   # uint8 [len(ids), *image_shape], in the order asked
    rows.read_range(a, b)

Two readers, chosen from the images array's layout:

- RawRows: an unsharded, uncompressed array (ImageLayout(compress=False), the layout
  ingest and RANDOM_READ_LAYOUT write). Zarr v3 stores each such chunk as one file of
  raw C-order bytes (the `bytes` codec, no other codec), so row r of chunk c sits at
  offset (r - c * chunk_rows) * row_bytes of file images/c/<c>/0/...; a row is one pread.
  Zarr costs ~1 ms per chunk touched, and a random row touches its own chunk, so this
  reads ~1,100 random rows in milliseconds instead of a second (bench/README.md,
  "Exemplar store layout"). Nothing is cached in the process: the OS page cache is. The
  first time a reader touches a chunk it reads the whole file once and checks its trailing
  CRC32C (what Zarr checks on a whole-chunk read), so flipped bits stop the run (StoreError
  naming the ingest) instead of being trained on.
- CachedChunkRows: any other layout (compressed, sharded). Whole chunks are read through
  Zarr and kept in an LRU cache bounded in bytes.

The layout is checked when the reader opens: a codec the raw reader does not understand
(compression, checksums, sharding) selects the cached reader, never misread bytes.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import google_crc32c  # what Zarr's Crc32cCodec uses
import numpy as np

from .store import ExemplarStore, StoreError


def _check_rows(ids: np.ndarray, n: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise IndexError(f"exemplar rows must be in 0..{n - 1}, got {ids.min()}..{ids.max()}")
    return ids


class RawRows:
    """Rows of a raw (uncompressed, unsharded) images array, by pread; no in-process cache."""

    def __init__(self, store: ExemplarStore, chunk_rows: int, chunk_key: callable,
                 checksummed: bool = False):
        self.store = store
        self.checksummed = checksummed  # each chunk file ends in a CRC32C of its bytes
        self._verified: set[int] = set()  # chunks checked once by this reader
        self.n = store.n
        self.image_shape = tuple(store.image_shape)
        self.row_bytes = int(np.prod(self.image_shape))
        self.chunk_rows = chunk_rows
        self._path_of = chunk_key
        self._fds: dict[int, int] = {}  # chunk -> open file descriptor (bounded below)
        self._max_fds = 256

    def _fd(self, chunk: int) -> int:
        fd = self._fds.get(chunk)
        if fd is None:
            if len(self._fds) >= self._max_fds:
                os.close(self._fds.pop(next(iter(self._fds))))
            path = self._path_of(chunk)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise StoreError(f"{path} is missing: the store's images are incomplete "
                                 f"(an interrupted ingest?); re-run the ingest") from None
            self._fds[chunk] = fd
            if chunk not in self._verified:
                self._verify(chunk, fd)
        return fd

    def _verify(self, chunk: int, fd: int) -> None:
        """Reads chunk's file once and checks its CRC32C trailer (StoreError if it differs)."""
        if self.checksummed:
            size = os.fstat(fd).st_size
            crc, at = 0, 0
            while at < size - 4:  # in pieces: memory stays bounded whatever the chunk size
                piece = os.pread(fd, min(1 << 20, size - 4 - at), at)
                if not piece:
                    break
                crc, at = google_crc32c.extend(crc, piece), at + len(piece)
            stored = os.pread(fd, 4, size - 4) if size >= 4 else b""
            if at != size - 4 or stored != np.uint32(crc).tobytes():
                raise StoreError(f"the exemplar images of {self.store.path} are corrupt: chunk "
                                 f"{chunk} ({self._path_of(chunk)}) fails its CRC32C checksum; "
                                 f"{self.store.rebuild_advice()}")
        self._verified.add(chunk)

    def read(self, ids: np.ndarray) -> np.ndarray:
        ids = _check_rows(ids, self.n)
        out = np.empty((ids.size, self.row_bytes), np.uint8)
        order = np.argsort(ids, kind="stable")  # sequential offsets within each file
        rb = self.row_bytes
        for i in order:
            row = int(ids[i])
            chunk, within = divmod(row, self.chunk_rows)
            data = os.pread(self._fd(chunk), rb, within * rb)
            if len(data) != rb:
                raise StoreError(f"chunk {chunk} of the store's images is truncated "
                                 f"({self._path_of(chunk)}); re-run the ingest")
            out[i] = np.frombuffer(data, np.uint8)
        return out.reshape(ids.size, *self.image_shape)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.n)
        out = np.empty((max(0, stop - start), self.row_bytes), np.uint8)
        rb, row = self.row_bytes, start
        while row < stop:
            chunk, within = divmod(row, self.chunk_rows)
            take = min(stop - row, self.chunk_rows - within)
            data = os.pread(self._fd(chunk), take * rb, within * rb)
            if len(data) != take * rb:
                raise StoreError(f"chunk {chunk} of the store's images is truncated; "
                                 f"re-run the ingest")
            out[row - start:row - start + take] = np.frombuffer(data, np.uint8).reshape(take, rb)
            row += take
        return out.reshape(-1, *self.image_shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class CachedChunkRows:
    """Rows of any images array through Zarr, whole chunks kept in a bytes-bounded LRU."""

    def __init__(self, store: ExemplarStore, chunk_rows: int, cache_bytes: int):
        self.store = store
        self.n = store.n
        self.image_shape = tuple(store.image_shape)
        self.chunk_rows = chunk_rows
        self.chunk_bytes = chunk_rows * int(np.prod(self.image_shape))
        self.max_chunks = max(1, cache_bytes // self.chunk_bytes)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def read(self, ids: np.ndarray) -> np.ndarray:
        ids = _check_rows(ids, self.n)
        chunks = ids // self.chunk_rows
        wanted = np.unique(chunks)
        missing = [int(c) for c in wanted if int(c) not in self._cache]
        self.hits += len(wanted) - len(missing)
        self.misses += len(missing)
        fetched: dict[int, np.ndarray] = {}
        if missing:
            # one Zarr call for all missing chunks: it reads them concurrently
            rows = np.concatenate([np.arange(c * self.chunk_rows,
                                             min(self.n, (c + 1) * self.chunk_rows))
                                   for c in missing])
            block = self.store.images(rows)
            offset = 0
            for c in missing:
                size = min(self.n, (c + 1) * self.chunk_rows) - c * self.chunk_rows
                fetched[c] = block[offset:offset + size]
                offset += size
        # take every chunk before remembering any: a request wider than the cache would
        # otherwise evict chunks it still needs
        data = {int(c): fetched[int(c)] if int(c) in fetched else self._cache[int(c)]
                for c in wanted}
        out = np.empty((ids.size, *self.image_shape), np.uint8)
        for c, rows in data.items():
            sel = chunks == c
            out[sel] = rows[ids[sel] - c * self.chunk_rows]
            self._remember(c, rows)
        return out

    def _remember(self, chunk: int, data: np.ndarray) -> None:
        self._cache[chunk] = data
        self._cache.move_to_end(chunk)
        while len(self._cache) > self.max_chunks:
            self._cache.popitem(last=False)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Streams past the cache (a refresh pass reads every row once)."""
        return self.store.images(slice(start, min(stop, self.n)))

    def close(self) -> None:
        self._cache.clear()


def raw_chunk_layout(store: ExemplarStore) -> Optional[tuple[int, callable, bool]]:
    """(chunk_rows, chunk -> file path, whether chunks end in a CRC32C) when the images array
    is raw and unsharded, else None."""
    meta = store.images_array.metadata.to_dict()
    codecs = meta.get("codecs", [])
    key = meta.get("chunk_key_encoding", {})
    # a trailing CRC32C (the store's checksum) sits after the chunk's bytes: the row offsets
    # are those of a plain chunk; RawRows checks it once per chunk (RawRows._verify)
    if [c.get("name") for c in codecs] not in (["bytes"], ["bytes", "crc32c"]) \
            or key.get("name") != "default":
        return None
    sep = key.get("configuration", {}).get("separator", "/")
    if sep != "/":
        return None
    chunk_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
    if tuple(meta["chunk_grid"]["configuration"]["chunk_shape"][1:]) != tuple(store.image_shape):
        return None
    root = Path(store.path) / "images"
    tail = "/".join("0" for _ in store.image_shape)

    def path_of(chunk: int) -> str:
        return str(root / "c" / str(chunk) / tail)

    return chunk_rows, path_of, [c.get("name") for c in codecs][-1] == "crc32c"


def open_row_reader(store: ExemplarStore, cache_bytes: int = 64 << 20):
    """The fastest reader the store's image layout allows (see the module docstring)."""
    raw = raw_chunk_layout(store)
    if raw is not None:
        return RawRows(store, *raw)
    chunk_rows = int(store.images_array.chunks[0])
    return CachedChunkRows(store, chunk_rows, cache_bytes)


__all__ = ["open_row_reader", "RawRows", "CachedChunkRows", "raw_chunk_layout"]
