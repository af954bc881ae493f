"""Datasets as train / validation / test arrays, split and binarized as in METHOD.md section 4.

    splits = load_dataset(cfg.data)        # DataSplits
    x = dynamic_binarize(splits.train_x[idx], rng)   # a fresh binary batch every step

- mnist, fashion_mnist: first 50,000 official training images train, last 10,000 validation,
  the official 10,000 test images. Training images stay grey (dynamic binarization).
- binarized_mnist: Larochelle & Murray's fixed binarization, its own 50k / 10k / 10k.
- omniglot (28x28): Burda's `chardata.mat` when `<root>/omniglot/chardata.mat` exists,
  otherwise a 28x28 version built from the 105x105 arrays (first 15 drawers of every
  character train, last 5 test). Either way the 24,345 training images are shuffled with a
  fixed seed into 23,000 train and 1,345 validation.

- colour_mnist (3x32x32, made here, no download): every MNIST digit padded to 32x32 and
  painted with a foreground and a background colour drawn per image from a fixed seed,
  stored as 8-bit levels; the same 50k / 10k / 10k split as mnist.

`data.pixels=8bit` (or `auto` with `model.likelihood=dlogistic`) keeps every split as 8-bit
levels k/255 (`dynamic=False`: nothing is binarized, the discretized-logistic decoder models
the levels); `data.labels=[...]` keeps only images of those classes in every split.

Validation and test images of the dynamic datasets are binarized ONCE, Bernoulli(grey), from
`DataConfig.binarize_seed` (one random stream per split, drawn over the whole split before
`n_valid` / `n_test` cut it, so a smoke run sees the same first images as a full run).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ..common.atomic import atomic_path
from ..common.levels import from_bytes
from . import sources
from .download import Fetch, ensure_file, writable_dir
from .splits import DataSplits, binarize_once, dynamic_binarize, take_first
from .readers import (IMAGE_PIXELS, OMNIGLOT_LEVELS, omniglot_to_28, read_binarized_mnist,
                      read_chardata, read_idx, read_omniglot_npz)

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("~/.cache/exvae_dist/data")
IMAGE_SHAPE = (1, 28, 28)
N_TRAIN_MNIST = 50_000  # the rest of the 60,000 official training images is validation
N_TRAIN_OMNIGLOT = 23_000  # of the 24,345 training images; the other 1,345 are validation
# Fixed seed of the Omniglot train/validation shuffle: the split must not move with any
# other seed, or runs would be compared on different validation sets.
OMNIGLOT_SPLIT_SEED = 1345
OMNIGLOT_CACHE = "omniglot28_from_npz_v1.npz"
OMNIGLOT_NPZ_NOTE = (
    "Omniglot 28x28 built here from the original 105x105 images (area averaging; per "
    "character the first 15 drawers train, the last 5 test), not Burda et al.'s chardata.mat: "
    "its log-likelihoods do not compare digit for digit with published Omniglot numbers.")
OMNIGLOT_CHARDATA_NOTE = "Omniglot 28x28 from Burda et al.'s chardata.mat (as in the papers)."


def data_root(cfg) -> Path:
    """The data folder: `cfg.root` (the entry point maps EXVAE_DATA_DIR into it), else
    ~/.cache/exvae_dist/data. cfg: exvae_dist.config.DataConfig."""
    return Path(cfg.root).expanduser() if cfg.root else DEFAULT_ROOT.expanduser()


def eight_bit(cfg) -> bool:
    """True when the splits keep 8-bit levels (data.pixels=8bit; config.validate resolves
    `auto` from model.likelihood)."""
    return getattr(cfg, "pixels", "binary") == "8bit"


def _evaluation_split(x: np.ndarray, cfg, stream: int) -> np.ndarray:
    """A validation / test split: binarized once, or kept as 8-bit levels."""
    return x if eight_bit(cfg) else binarize_once(x, cfg.binarize_seed, stream)


def keep_labels(s: DataSplits, labels) -> DataSplits:
    """Only the images whose class is in `labels` (None: all), in every split."""
    if labels is None:
        return s
    if s.train_y is None:
        raise ValueError(f"data.labels={list(labels)}, but {s.name} has no labels; "
                         f"leave data.labels null")
    wanted = np.asarray(sorted(set(int(v) for v in labels)), dtype=np.int64)

    def cut(x, y):
        keep = np.isin(y, wanted)
        return x[keep], y[keep]

    s.train_x, s.train_y = cut(s.train_x, s.train_y)
    s.valid_x, s.valid_y = cut(s.valid_x, s.valid_y)
    s.test_x, s.test_y = cut(s.test_x, s.test_y)
    if not len(s.train_x):
        raise ValueError(f"data.labels={wanted.tolist()} keeps no training image of {s.name}")
    return s


def load_dataset(cfg, *, fetch: Optional[Fetch] = None, train_in_memory: bool = True
                 ) -> DataSplits:
    """cfg: exvae_dist.config.DataConfig -> DataSplits, files fetched if missing and allowed.

    `fetch(url, dest)` replaces the HTTP download (tests, mirrors). train_in_memory=False
    (the Ray driver on an ingested store) leaves train_x None: the workers read the training
    rows from the store itself.
    """
    if cfg.name == "store":  # an ingested exemplar store (python -m exvae_dist.ingest)
        from .store_data import load_store_splits
        if not train_in_memory and (cfg.n_train is not None or cfg.labels is not None):
            raise ValueError("data.n_train / data.labels cut the training set in memory, but "
                             "the Ray trainer reads an ingested store's training rows where "
                             "they are: ingest the subset you want into a store of its own")
        return take_first(load_store_splits(cfg, train_in_memory), cfg)
    loaders = {"mnist": _load_idx_dataset, "fashion_mnist": _load_idx_dataset,
               "binarized_mnist": _load_binarized_mnist, "omniglot": _load_omniglot,
               "colour_mnist": _load_colour_mnist}
    if cfg.name not in loaders:
        raise ValueError(f"data.name={cfg.name!r} is not one of {', '.join(loaders)}")
    folder = data_root(cfg) / sources.FOLDERS[cfg.name]
    if eight_bit(cfg) and cfg.name == "binarized_mnist":
        raise ValueError("data.pixels=8bit: binarized_mnist has binary pixels only; use "
                         "data.name=mnist for 8-bit levels, or data.pixels=binary")
    splits = loaders[cfg.name](cfg, folder, fetch)
    splits = keep_labels(splits, getattr(cfg, "labels", None))
    splits = take_first(splits, cfg)
    log.info("%s: %d train / %d validation / %d test images from %s", splits.name,
             len(splits.train_x), len(splits.valid_x), len(splits.test_x), folder)
    return splits


def required_files(cfg) -> list[tuple[sources.RemoteFile, Path]]:
    """(registered file, folder) pairs that load_dataset(cfg) reads, so a run can check them
    (present, or fetched when cfg.download; sha256 verified) before anything starts. A copy
    the loaders accept without a registered file (binarized MNIST's .amat text, Omniglot's
    chardata.mat or its 28x28 cache) stands in for the registered ones."""
    if cfg.name not in sources.FOLDERS:  # a store, or a name load_dataset refuses itself
        return []
    folder = data_root(cfg) / sources.FOLDERS[cfg.name]
    if cfg.name in ("mnist", "colour_mnist"):
        mnist = data_root(cfg) / sources.FOLDERS["mnist"]
        return [(r, mnist) for r in sources.MNIST.values()]
    if cfg.name == "fashion_mnist":
        return [(r, folder) for r in sources.FASHION_MNIST.values()]
    if cfg.name == "binarized_mnist":
        return [(r, folder) for split, r in sources.BINARIZED_MNIST.items()
                if (folder / r.name).is_file()
                or not (folder / sources.BINARIZED_MNIST_AMAT[split]).is_file()]
    if cfg.name == "omniglot":
        if (folder / sources.OMNIGLOT_CHARDATA).is_file() or (folder / OMNIGLOT_CACHE).is_file():
            return []
        return [(r, folder) for r in sources.OMNIGLOT_NPZ.values()]
    return []


# ------------------------------------------------------------------- per dataset

def _load_idx_dataset(cfg, folder: Path, fetch: Optional[Fetch]) -> DataSplits:
    registry = sources.MNIST if cfg.name == "mnist" else sources.FASHION_MNIST
    paths = {key: ensure_file(remote, folder, download=cfg.download, fetch=fetch)
             for key, remote in registry.items()}
    train_images, train_labels = read_idx(paths["train_images"]), read_idx(paths["train_labels"])
    test_images, test_labels = read_idx(paths["test_images"]), read_idx(paths["test_labels"])
    expected = {"train_images": (60_000, 28, 28), "train_labels": (60_000,),
                "test_images": (10_000, 28, 28), "test_labels": (10_000,)}
    got = {"train_images": train_images.shape, "train_labels": train_labels.shape,
           "test_images": test_images.shape, "test_labels": test_labels.shape}
    for key, shape in expected.items():
        if tuple(got[key]) != shape:
            raise ValueError(f"{paths[key]} holds shape {got[key]}, expected {shape}")

    def grey(a: np.ndarray) -> np.ndarray:
        return from_bytes(a.reshape(len(a), IMAGE_PIXELS)).numpy()

    n = N_TRAIN_MNIST
    return DataSplits(
        name=cfg.name,
        train_x=grey(train_images[:n]),
        train_y=train_labels[:n].astype(np.int64),
        valid_x=_evaluation_split(grey(train_images[n:]), cfg, 1),
        valid_y=train_labels[n:].astype(np.int64),
        test_x=_evaluation_split(grey(test_images), cfg, 2),
        test_y=test_labels.astype(np.int64),
        image_shape=IMAGE_SHAPE,
        dynamic=not eight_bit(cfg),
    )


def _load_binarized_mnist(cfg, folder: Path, fetch: Optional[Fetch]) -> DataSplits:
    arrays = {}
    for split, remote in sources.BINARIZED_MNIST.items():
        amat = folder / sources.BINARIZED_MNIST_AMAT[split]
        if not (folder / remote.name).is_file() and amat.is_file():
            # Larochelle's text release (or another copy) under its original name: no
            # registered checksum, so it is only checked for shape and values.
            log.warning("using %s without a checksum (no registered hash for .amat files)", amat)
            path = amat
        else:
            path = ensure_file(remote, folder, download=cfg.download, fetch=fetch)
        arrays[split] = read_binarized_mnist(path).astype(np.float32)
    sizes = {split: len(a) for split, a in arrays.items()}
    if sizes != {"train": 50_000, "valid": 10_000, "test": 10_000}:
        raise ValueError(f"binarized MNIST in {folder} has split sizes {sizes}, expected "
                         f"50,000 / 10,000 / 10,000")
    return DataSplits(name=cfg.name, train_x=arrays["train"], train_y=None,
                      valid_x=arrays["valid"], valid_y=None, test_x=arrays["test"], test_y=None,
                      image_shape=IMAGE_SHAPE, dynamic=False)


def _load_omniglot(cfg, folder: Path, fetch: Optional[Fetch]) -> DataSplits:
    chardata = folder / sources.OMNIGLOT_CHARDATA
    if chardata.is_file():
        train_x, train_y, test_x, test_y = _omniglot_from_chardata(chardata)
        note = OMNIGLOT_CHARDATA_NOTE
    else:
        train_x, train_y, test_x, test_y = _omniglot_from_npz(folder, cfg.download, fetch)
        note = OMNIGLOT_NPZ_NOTE
        log.warning("%s not found: %s", chardata, OMNIGLOT_NPZ_NOTE)
    perm = np.random.default_rng(OMNIGLOT_SPLIT_SEED).permutation(len(train_x))
    tr, va = perm[:N_TRAIN_OMNIGLOT], perm[N_TRAIN_OMNIGLOT:]
    return DataSplits(
        name=cfg.name,
        train_x=train_x[tr],
        train_y=train_y[tr],
        valid_x=_evaluation_split(train_x[va], cfg, 1),
        valid_y=train_y[va],
        test_x=_evaluation_split(test_x, cfg, 2),
        test_y=test_y,
        image_shape=IMAGE_SHAPE,
        dynamic=not eight_bit(cfg),
        note=note,
    )


def _omniglot_from_chardata(path: Path):
    """Grey images and character ids 0..1622 from chardata.mat.

    The file labels each image by (alphabet, character within the alphabet); the id is the
    rank of that pair among all pairs of the file (train and test together).
    """
    d = read_chardata(path)
    pairs = np.concatenate([np.stack([d["train_alphabet"], d["train_char"]], 1),
                            np.stack([d["test_alphabet"], d["test_char"]], 1)])
    _, ids = np.unique(pairs, axis=0, return_inverse=True)
    ids = ids.reshape(-1).astype(np.int64)
    n = len(d["train_x"])
    return d["train_x"], ids[:n], d["test_x"], ids[n:]


def _omniglot_from_npz(folder: Path, download: bool, fetch: Optional[Fetch]):
    """28x28 grey Omniglot from the 105x105 arrays; cached in `folder` when it is writable.

    Returns train_x [24345, 784] float32, train_y [24345] int64 (character id 0..1622:
    background characters 0..963, then evaluation ones), test_x [8115, 784], test_y [8115].
    Images are ordered by character, then drawer.
    """
    cache = folder / OMNIGLOT_CACHE
    stamp = "|".join(r.sha256 for r in sources.OMNIGLOT_NPZ.values())
    arrays = _read_omniglot_cache(cache, stamp)
    if arrays is None:
        arrays = _build_omniglot_28(folder, download, fetch)
        _write_omniglot_cache(cache, stamp, arrays)
    levels = np.float32(OMNIGLOT_LEVELS)
    return (arrays["train_levels"].astype(np.float32) / levels, arrays["train_y"],
            arrays["test_levels"].astype(np.float32) / levels, arrays["test_y"])


def _build_omniglot_28(folder: Path, download: bool, fetch: Optional[Fetch]) -> dict:
    parts = {"train_levels": [], "train_y": [], "test_levels": [], "test_y": []}
    first_id = 0
    for remote in sources.OMNIGLOT_NPZ.values():
        images = read_omniglot_npz(ensure_file(remote, folder, download=download, fetch=fetch))
        n_char = images.shape[0]
        ids = np.arange(first_id, first_id + n_char, dtype=np.int64)
        # Split by drawer inside every character: both splits see all 1623 characters.
        parts["train_levels"].append(omniglot_to_28(images[:, :15].reshape(-1, 105, 105)))
        parts["train_y"].append(np.repeat(ids, 15))
        parts["test_levels"].append(omniglot_to_28(images[:, 15:].reshape(-1, 105, 105)))
        parts["test_y"].append(np.repeat(ids, 5))
        first_id += n_char
    return {k: np.concatenate(v) for k, v in parts.items()}


def _read_omniglot_cache(cache: Path, stamp: str) -> Optional[dict]:
    if not cache.is_file():
        return None
    try:
        with np.load(cache) as f:
            if str(f["stamp"]) != stamp:
                log.info("ignoring %s: built from other source files", cache)
                return None
            return {k: f[k] for k in ("train_levels", "train_y", "test_levels", "test_y")}
    except (OSError, ValueError, KeyError) as err:
        log.warning("ignoring unreadable %s (%s); rebuilding", cache, err)
        return None


def _write_omniglot_cache(cache: Path, stamp: str, arrays: dict) -> None:
    """Temp file + rename, and only where the data folder is writable (a shared read-only
    data set is simply rebuilt in memory each time)."""
    if not writable_dir(cache.parent):
        log.info("%s is read-only: the 28x28 Omniglot is not cached", cache.parent)
        return
    try:
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, stamp=np.array(stamp), **arrays)
    except OSError as err:
        log.warning("could not cache the 28x28 Omniglot in %s: %s", cache, err)


COLOUR_SHAPE = (3, 32, 32)
COLOUR_SEED = 32  # fixed: the colours must not move with any other seed


def colourize_digits(digits: np.ndarray, seed: int) -> np.ndarray:
    """uint8 [n, 28, 28] grey digits -> uint8 [n, 3 * 32 * 32] colour images (C, H, W order).

    Each image is padded to 32x32 and painted: pixel = (1 - a) * background + a * foreground,
    a the digit's grey level, both colours drawn per image (foreground bright, background
    dark, so the digit stays visible); deterministic in `seed`.
    """
    rng = np.random.default_rng(seed)
    n = len(digits)
    fg = rng.uniform(0.45, 1.0, (n, 3, 1, 1)).astype(np.float32)
    bg = rng.uniform(0.0, 0.45, (n, 3, 1, 1)).astype(np.float32)
    out = np.empty((n, 3 * 32 * 32), dtype=np.uint8)
    for start in range(0, n, 5000):  # blocks: float temporaries stay ~60 MB
        sl = slice(start, start + 5000)
        a = np.pad(from_bytes(digits[sl]).numpy(), ((0, 0), (2, 2), (2, 2)))[:, None]
        img = (1 - a) * bg[sl] + a * fg[sl]
        out[sl] = np.rint(img * 255).astype(np.uint8).reshape(len(a), -1)
    return out


def _load_colour_mnist(cfg, folder: Path, fetch: Optional[Fetch]) -> DataSplits:
    """colour_mnist, made from the MNIST files in <root>/mnist (see the module docstring)."""
    mnist_folder = data_root(cfg) / sources.FOLDERS["mnist"]
    paths = {key: ensure_file(remote, mnist_folder, download=cfg.download, fetch=fetch)
             for key, remote in sources.MNIST.items()}
    train = colourize_digits(read_idx(paths["train_images"]), COLOUR_SEED)
    test = colourize_digits(read_idx(paths["test_images"]), COLOUR_SEED + 1)
    train_y = read_idx(paths["train_labels"]).astype(np.int64)
    test_y = read_idx(paths["test_labels"]).astype(np.int64)

    def levels(a: np.ndarray) -> np.ndarray:
        return from_bytes(a).numpy()

    n = N_TRAIN_MNIST
    return DataSplits(name=cfg.name, train_x=levels(train[:n]), train_y=train_y[:n],
                      valid_x=_evaluation_split(levels(train[n:]), cfg, 1), valid_y=train_y[n:],
                      test_x=_evaluation_split(levels(test), cfg, 2), test_y=test_y,
                      image_shape=COLOUR_SHAPE, dynamic=not eight_bit(cfg),
                      note="colour_mnist: MNIST digits painted with per-image colours, made "
                           "here (not a published dataset)")


__all__ = ["DataSplits", "load_dataset", "data_root", "dynamic_binarize", "binarize_once",
           "keep_labels", "eight_bit", "colourize_digits"]
