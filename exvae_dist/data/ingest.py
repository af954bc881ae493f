"""Bring your own images into an exemplar store (`python -m exvae_dist.ingest SOURCE STORE`,
commands/ingest.py, is its command line).

SOURCE is one of
  images.npy            uint8 / bool / float-in-[0,1] array [N, H, W] or [N, C, H, W]
                        (memory-mapped; [N, H, W, C] with C = 1, 3 or 4 is transposed);
                        labels from --labels labels.npy
  data.npz              the same inside an .npz (keys --images-key / --labels-key;
                        uncompressed members are memory-mapped)
  a folder              PNG / JPEG files, all the same size, read as grey levels; with one
                        sub-folder per class, the sub-folder names are the labels (in
                        sorted order: the map is printed and kept in the store's label_map)
  path/to/array.zarr    an existing Zarr array (labels from --labels, another Zarr array)
  deformed-mnist:N      N MNIST digits with labels: rows 0..49,999 are MNIST's training
                        digits as they are, later rows deformed copies of them
                        (exvae_dist/data/deformed.py, --seed); validation and test are
                        the standard MNIST ones

STORE is the exemplar store to write (a Zarr v3 group). The ingest streams one block of
rows at a time (never the whole set in memory), shows a progress bar, and can be
interrupted: re-run the same command and it resumes from the last written block. Until it
finishes, the store is refused by training and evaluation.

Values are checked before the store is created (a float array is read once for NaN and
for values outside [0, 1]), so a refused source leaves nothing behind.

Held-out splits (except deformed-mnist): --valid and --test rows are drawn from the source
by a keyed permutation of --split-seed; the rest, in source order, are the exemplars.

Leave-one-out is by row id: the prior of training image i leaves out exemplar row i only, so
an exact duplicate of an image (another row with the same pixels) stays in its prior and
explains it for free. The ingest counts exact duplicate training rows and lists the first
few; --drop-duplicates keeps only the first of each (one more read of the source).

Then train on it:  python -m exvae_dist.train data.name=store data.store=STORE
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..common.levels import to_bytes
from ..common.progress import progress_bar
from ..core.keyed import SPLIT, KeyedPermutation
from ..common.errors import KnownError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class IngestError(KnownError, ValueError):
    """A source that cannot be ingested as given; the message says why and what to do."""


class StoreFullError(KnownError, OSError):
    """The disk filled up during the ingest; the blocks written so far are kept and a re-run
    of the same command resumes (the message says so)."""


# ------------------------------------------------------------------------- values

def to_uint8(x: np.ndarray, where: str) -> np.ndarray:
    """Validated grey levels as uint8: uint8 as is, bool -> 0/255, floats in [0, 1] ->
    rint(255 x), integers in 0..255 cast. Anything else is an IngestError."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise IngestError(f"{where}: images contain NaN or inf; drop those rows or "
                              f"replace the values (np.nan_to_num) first")
        lo, hi = float(x.min(initial=0)), float(x.max(initial=0))
        if lo < 0 or hi > 1:
            raise IngestError(f"{where}: float images must lie in [0, 1], got {lo}..{hi}; "
                              f"divide by 255 (or convert to uint8) first")
        return to_bytes(x)
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min(initial=0)), int(x.max(initial=0))
        if lo < 0 or hi > 255:
            raise IngestError(f"{where}: integer images must lie in 0..255, got {lo}..{hi}")
        return x.astype(np.uint8)
    raise IngestError(f"{where}: unsupported image dtype {x.dtype} (use uint8, bool or float)")


def check_labels(y: Optional[np.ndarray], n: int, where: str) -> Optional[np.ndarray]:
    if y is None:
        return None
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise IngestError(f"{where}: labels must be integers [{n}], got {y.dtype} {y.shape}")
    if n and y.min() < 0:
        raise IngestError(f"{where}: labels must be non-negative class ids")
    return y.astype(np.int64)


CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def image_shape_of(shape: tuple[int, ...], where: str) -> tuple[tuple[int, ...], bool]:
    """(image shape (C, H, W), whether the source is channel-last): [N, H, W] -> (1, H, W);
    [N, C, H, W] kept; [N, H, W, C] with C in 1, 3, 4 and H, W larger is channel-last (read
    transposed); a shape that could be either is refused with the fix; others refused."""
    if len(shape) == 3:
        return (1, *shape[1:]), False
    if len(shape) == 4:
        first, last = shape[1] in CHANNELS, shape[3] in CHANNELS
        if last and not first and min(shape[1], shape[2]) > shape[3]:
            log.info("%s: %s read as channel-last [N, H, W, C] and transposed to [N, C, H, W]",
                     where, shape)
            return (shape[3], shape[1], shape[2]), True
        if last and first:
            raise IngestError(
                f"{where}: shape {shape} could be [N, C, H, W] or [N, H, W, C]; save it as "
                f"[N, C, H, W] (np.moveaxis(x, -1, 1) for channel-last) and ingest that")
        return tuple(shape[1:]), False
    raise IngestError(f"{where}: images must be [N, H, W], [N, C, H, W] or [N, H, W, C], got "
                      f"shape {shape}")


# ------------------------------------------------------------------------ sources

class ArraySource:
    """Any array-like with [rows] slicing: a memory-mapped .npy / .npz member, a Zarr array."""

    def __init__(self, images, labels, spec: dict, where: str):
        self.images, self.where, self.spec = images, where, spec
        self.n = int(images.shape[0])
        self.image_shape, self.channels_last = image_shape_of(tuple(images.shape), where)
        if self.channels_last:  # a resume must read the source the same way
            self.spec = {**spec, "channels_last": True}
        self.labels = None if labels is None else check_labels(np.asarray(labels[:]), self.n,
                                                               where)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """uint8 [len(rows), *image_shape] and labels; rows sorted ascending."""
        if rows.size == 0:
            return np.empty((0, *self.image_shape), np.uint8), None
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        block = np.asarray(self.images[lo:hi])[rows - lo]  # one contiguous read per block
        if self.channels_last:
            block = np.moveaxis(block, -1, 1)
        x = to_uint8(block, f"{self.where} rows {lo}..{hi - 1}").reshape(len(rows),
                                                                        *self.image_shape)
        return x, (None if self.labels is None else self.labels[rows])

    def check_values(self, block_rows: int = 8192) -> None:
        """Reads the whole source once when its dtype needs a range check (floats, wide
        integers), so bad values are refused before the store is created."""
        if self.images.dtype in (np.uint8, np.bool_):
            return
        for lo in range(0, self.n, block_rows):
            hi = min(self.n, lo + block_rows)
            to_uint8(np.asarray(self.images[lo:hi]), f"{self.where} rows {lo}..{hi - 1}")


def _npz_member_memmap(path: Path, key: str):
    """An uncompressed .npz member as a read-only memmap (np.load would read it whole)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = int.from_bytes(local[26:28], "little"), \
                int.from_bytes(local[28:30], "little")
            f.seek(info.header_offset + 30 + name_len + extra_len)
            major, _ = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    if fortran:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)


def numpy_source(path: Path, labels: Optional[str], images_key: Optional[str],
                 labels_key: Optional[str]) -> ArraySource:
    spec = {"kind": "numpy", "path": str(path.resolve())}
    if path.suffix == ".npy":
        images = np.load(path, mmap_mode="r")
        y = np.load(labels, mmap_mode="r") if labels else None
        return ArraySource(images, y, {**spec, "labels": labels}, str(path))
    with np.load(path) as f:
        keys = list(f.keys())
    ikey = images_key or next((k for k in ("images", "x", "train_x", "arr_0") if k in keys), None)
    if ikey not in keys:
        raise IngestError(f"{path} has no images array {ikey!r}; its keys are {keys}: "
                          f"name it with --images-key")
    lkey = labels_key or next((k for k in ("labels", "y", "train_y") if k in keys), None)
    if labels_key and labels_key not in keys:
        raise IngestError(f"{path} has no labels array {labels_key!r}; its keys are {keys}")
    images = _npz_member_memmap(path, ikey)
    if images is None:
        log.warning("%s: member %s is compressed, so it is read whole into memory", path, ikey)
        images = np.load(path)[ikey]
    y = np.load(path)[lkey] if lkey else None
    return ArraySource(images, y, {**spec, "images_key": ikey, "labels_key": lkey}, str(path))


def zarr_source(path: Path, labels: Optional[str]) -> ArraySource:
    from ..retrieval.store_ingest import open_zarr_images
    images = open_zarr_images(path)
    y = open_zarr_images(labels) if labels else None
    return ArraySource(images, y, {"kind": "zarr", "path": str(path.resolve()),
                                   "labels": labels}, str(path))


class FolderSource:
    """PNG / JPEG files (sorted by path); one sub-folder per class gives labels."""

    def __init__(self, path: Path):
        try:
            from PIL import Image  # noqa: F401
        except ImportError:
            raise IngestError("reading image folders needs Pillow: pip install 'pillow>=10,<14'") \
                from None
        self.where = str(path)
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise IngestError(f"{path} holds no .png / .jpg / .jpeg files")
        parents = sorted({p.parent for p in files})
        if parents == [path]:
            self.classes, self.labels = [], None
        else:
            if any(p.parent == path for p in files) or any(q.parent != path for q in parents):
                raise IngestError(f"{path}: put every image either directly in the folder, or in "
                                  f"exactly one sub-folder per class (one level deep), not both")
            self.classes = [q.name for q in parents]  # label = position in sorted order
            index = {q: i for i, q in enumerate(parents)}
            self.labels = np.array([index[p.parent] for p in files], dtype=np.int64)
        self.files = files
        self.n = len(files)
        first = self._load(files[0])
        self.image_shape = (1, *first.shape)
        self.spec = {"kind": "folder", "path": str(path.resolve()), "n": self.n,
                     "classes": self.classes}

    def _load(self, file: Path) -> np.ndarray:
        from PIL import Image
        try:
            with Image.open(file) as im:
                return np.asarray(im.convert("L"), dtype=np.uint8)
        except Exception as err:
            raise IngestError(f"{file} is not a readable image ({type(err).__name__}: {err})") \
                from None

    def check_values(self) -> None:
        """Every file's size from its header (cheap), before the store is created."""
        from PIL import Image
        want = self.image_shape[:0:-1]
        for file in self.files:
            try:
                with Image.open(file) as im:
                    size = im.size
            except Exception as err:
                raise IngestError(f"{file} is not a readable image ({type(err).__name__}: "
                                  f"{err})") from None
            if size != want:
                raise IngestError(f"{file} is {size} pixels, the first image {self.files[0]} "
                                  f"is {want}: resize them to one size first")

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        out = np.empty((len(rows), *self.image_shape), np.uint8)
        for i, r in enumerate(rows):
            x = self._load(self.files[r])
            if (1, *x.shape) != self.image_shape:
                raise IngestError(f"{self.files[r]} is {x.shape[::-1]} pixels, the first image "
                                  f"{self.files[0]} is {self.image_shape[:0:-1]}: resize them "
                                  f"to one size first")
            out[i, 0] = x
        return out, (None if self.labels is None else self.labels[rows])


class DeformedMnistSource:
    """deformed-mnist:N, seeded by --seed; held-out splits are MNIST's own."""

    def __init__(self, n: int, seed: int, data_root: Optional[str]):
        from ..config import DataConfig
        from ..data.datasets import N_TRAIN_MNIST, data_root as root_of
        from ..data.download import ensure_file
        from ..data.readers import read_idx
        from ..data import sources
        cfg = DataConfig(root=data_root)
        folder = root_of(cfg) / sources.FOLDERS["mnist"]
        paths = {k: ensure_file(r, folder, download=True) for k, r in sources.MNIST.items()}
        train_x, train_y = read_idx(paths["train_images"]), read_idx(paths["train_labels"])
        self.base, self.base_labels = train_x[:N_TRAIN_MNIST], train_y[:N_TRAIN_MNIST]
        self.held_out = {
            "valid": (train_x[N_TRAIN_MNIST:][:, None], train_y[N_TRAIN_MNIST:].astype(np.int64)),
            "test": (read_idx(paths["test_images"])[:, None],
                     read_idx(paths["test_labels"]).astype(np.int64))}
        self.n, self.seed = int(n), int(seed)
        self.image_shape = (1, 28, 28)
        self.labels = True
        self.spec = {"kind": "deformed-mnist", "n": self.n, "seed": self.seed}
        self.where = f"deformed-mnist:{n}"

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        from ..data.deformed import deformed_rows
        x, y = deformed_rows(self.base, self.base_labels, rows, self.seed)
        return x[:, None], y


def open_source(spec: str, args) -> object:
    m = re.fullmatch(r"deformed-mnist:([0-9.e+]+)", spec)
    if m:
        n = int(float(m.group(1)))
        if n < 1:
            raise IngestError(f"{spec}: N must be a positive count")
        return DeformedMnistSource(n, args.seed, args.data_root)
    path = Path(spec).expanduser()
    if not path.exists():
        raise IngestError(f"{spec} does not exist (give a .npy / .npz file, an image folder, a "
                          f"Zarr array or deformed-mnist:N)")
    if path.suffix in (".npy", ".npz"):
        return numpy_source(path, args.labels, args.images_key, args.labels_key)
    if (path / "zarr.json").is_file() or (path / ".zarray").is_file():
        return zarr_source(path, args.labels)
    if path.is_dir():
        return FolderSource(path)
    raise IngestError(f"{spec}: not a .npy / .npz file, an image folder or a Zarr array")


# ------------------------------------------------------------------------- ingest

def held_out_rows(n: int, n_valid: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted source rows of the validation and test splits: those whose position under a
    keyed permutation of [0, n) is below n_valid (valid) or n_valid + n_test (test)."""
    if n_valid < 1 or n_test < 1 or n_valid + n_test >= n:
        raise IngestError(f"--valid {n_valid} and --test {n_test} must be >= 1 and leave "
                          f"training rows out of {n}")
    perm = KeyedPermutation(n, seed, SPLIT)
    chosen = perm.inverse(np.arange(n_valid + n_test))
    return np.sort(chosen[:n_valid]), np.sort(chosen[n_valid:])


def train_rows(positions: np.ndarray, held_sorted: np.ndarray) -> np.ndarray:
    """Source rows of training positions: the p-th source row that is not held out."""
    gaps = held_sorted - np.arange(len(held_sorted))  # training rows before each held-out one
    return positions + np.searchsorted(gaps, positions, side="right")


def row_hashes(images: np.ndarray) -> np.ndarray:
    """uint64 [len] 8-byte BLAKE2b of each row's bytes: equal rows, equal hashes (an exact
    duplicate test with a 2^-64 chance of a false match per pair)."""
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    return np.frombuffer(b"".join(hashlib.blake2b(r.tobytes(), digest_size=8).digest()
                                  for r in flat), dtype="<u8").copy()


def duplicate_report(hashes: np.ndarray, show: int = 5) -> dict:
    """{"count": rows equal to an earlier row, "examples": [[first, repeat], ...]} in row order."""
    order = np.argsort(hashes, kind="stable")
    ranked = hashes[order]
    repeat = np.flatnonzero(ranked[1:] == ranked[:-1]) + 1  # sorted positions of repeats
    if not len(repeat):
        return {"count": 0, "examples": []}
    first_of = np.searchsorted(ranked, ranked[repeat])  # first sorted position of each value
    pairs = np.stack([order[first_of], order[repeat]], 1)
    pairs = pairs[np.argsort(pairs[:, 1], kind="stable")][:show]
    return {"count": int(len(repeat)), "examples": pairs.tolist()}


def _full_disk(store_path: Path, err: OSError) -> StoreFullError:
    """ENOSPC named as such, with the free space and how to resume."""
    try:
        free = f"{shutil.disk_usage(store_path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return StoreFullError(
        errno.ENOSPC, f"no space left on device writing {store_path} ({free} on "
        f"{store_path.parent}; {err}). The blocks written so far are kept and the store is "
        f"refused until finished: free space and rerun the same command to resume it, or "
        f"delete {store_path} to give up")


def ingest(source, store_path: str | Path, *, n_valid: int = 0, n_test: int = 0,
           split_seed: int = 0, block_rows: int = 8192, progress: bool = True,
           latent_dim: int = 40, stop_after_blocks: Optional[int] = None,
           drop_duplicates: bool = False) -> str:
    """Streams `source` into the store at `store_path`; returns the store's fingerprint.

    Values are checked before the store is created. drop_duplicates: exact duplicate
    training rows are left out (the first of each kept); otherwise they are counted and the
    first few listed (the store's `duplicates` attribute, and the log).
    stop_after_blocks: write at most that many blocks, then return "" (tests of resuming).
    """
    from ..retrieval.store_ingest import StoreBuilder
    store_path = Path(store_path).expanduser()
    check = getattr(source, "check_values", None)
    if check is not None and not (store_path / "zarr.json").is_file():
        check()  # a resumed store's source passed it already
    deformed = isinstance(source, DeformedMnistSource)
    if deformed:  # held-out splits are MNIST's own
        held = np.empty(0, np.int64)
        n_train, n_valid, n_test = source.n, 0, 0
    else:
        valid_rows, test_rows = held_out_rows(source.n, n_valid, n_test, split_seed)
        held = np.sort(np.concatenate([valid_rows, test_rows]))
        n_train = source.n - len(held)
    keep = None  # source rows of the training positions when duplicates are dropped
    if drop_duplicates:
        keep, dropped = _first_of_each(source, held, n_train, block_rows, progress)
        n_train = len(keep)
        log.info("--drop-duplicates: %d exact duplicate training rows left out", dropped)
    # split_scheme names the keyed permutation that picks held-out rows: a half-written
    # store from a version with another one is refused on resume instead of mixing splits
    spec = {**source.spec, "valid": n_valid, "test": n_test, "split_seed": split_seed,
            "split_scheme": "feistel-unbalanced-4"}
    if drop_duplicates:
        spec["drop_duplicates"] = True
    try:
        builder = StoreBuilder(store_path, n_train, source.image_shape,
                               labelled=source.labels is not None, source=spec,
                               block_rows=block_rows, latent_dim=latent_dim)
        done = builder.done_blocks()
        todo = [b for b in range(builder.n_blocks) if not done[b]]
        if done.any():
            log.info("resuming %s: %d of %d blocks already written", store_path,
                     int(done.sum()), builder.n_blocks)
        hashes = np.zeros(n_train, dtype=np.uint64)
        for block in np.flatnonzero(done):  # rows written by an earlier attempt, from the store
            start, stop = builder.block_range(block)
            hashes[start:stop] = row_hashes(builder.root["images"][start:stop])
        written = sum(stop - start for start, stop in map(builder.block_range,
                                                          np.flatnonzero(done)))
        bar = progress_bar(total=n_train, initial=written, unit="img",
                           desc=f"ingest {source.where}", disable=not progress)
        for i, block in enumerate(todo):
            if stop_after_blocks is not None and i >= stop_after_blocks:
                bar.close()
                return ""
            start, stop = builder.block_range(block)
            if keep is not None:
                rows = keep[start:stop]
            elif len(held):
                rows = train_rows(np.arange(start, stop), held)
            else:
                rows = np.arange(start, stop)
            images, labels = source.read(rows)
            builder.write_block(block, images, labels)
            hashes[start:stop] = row_hashes(images)
            bar.update(stop - start)
        bar.close()
        if deformed:
            splits = source.held_out
        else:
            splits = {"valid": source.read(valid_rows), "test": source.read(test_rows)}
        binary = all(bool(np.isin(splits[s][0], (0, 255)).all()) for s in ("valid", "test"))
        classes = getattr(source, "classes", [])
        duplicates = duplicate_report(hashes)
        extra = {"binary": binary, "classes": classes, "duplicates": duplicates}
        if classes:  # readable in the store's zarr.json: class name -> label
            extra["label_map"] = {name: label for label, name in enumerate(classes)}
        fingerprint = builder.finish(splits, extra)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _full_disk(store_path, err) from err
        raise
    if duplicates["count"]:
        log.warning("%d training rows are exact duplicates of earlier rows (first few as "
                    "[row, its duplicate]: %s); leave-one-out is by row id, so each keeps its "
                    "twin in its prior: re-run with --drop-duplicates to leave them out",
                    duplicates["count"], duplicates["examples"])
    log.info("ingested %d exemplars into %s (fingerprint %s)", n_train, store_path, fingerprint)
    return fingerprint


def _first_of_each(source, held: np.ndarray, n_train: int, block_rows: int,
                   progress: bool) -> tuple[np.ndarray, int]:
    """(source rows of the training positions whose pixels no earlier one has, how many were
    left out): one read of the source's training rows."""
    hashes = np.empty(n_train, dtype=np.uint64)
    rows_of = np.empty(n_train, dtype=np.int64)
    bar = progress_bar(total=n_train, unit="img", desc="finding duplicates",
                       disable=not progress)
    for start in range(0, n_train, block_rows):
        stop = min(n_train, start + block_rows)
        rows = train_rows(np.arange(start, stop), held) if len(held) else np.arange(start, stop)
        hashes[start:stop] = row_hashes(source.read(rows)[0])
        rows_of[start:stop] = rows
        bar.update(stop - start)
    bar.close()
    _, first = np.unique(hashes, return_index=True)
    keep = np.sort(first)
    return rows_of[keep], n_train - len(keep)
