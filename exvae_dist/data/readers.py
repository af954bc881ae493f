"""Readers of the on-disk formats: IDX (MNIST, Fashion-MNIST), MATLAB / text `.amat`
(static binarized MNIST), `chardata.mat` and the 105x105 Omniglot `.npz`; plus the exact
area-averaging downsampler that turns 105x105 Omniglot into 28x28.

Readers return images as they are stored (uint8 / bool / float); scaling, splitting and
binarization happen in datasets.py. Decoded arrays are cached per process, keyed by path,
size and mtime, and returned read-only so that no caller can corrupt the cache.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import scipy.io

IMAGE_PIXELS = 784  # 28 x 28

# 105 -> 28 is a factor of 3.75: every area weight is a multiple of 1/15, so a 28x28 grey
# level times 15^2 = 225 is an integer in [0, 225]. Storing those integers (uint8) is
# lossless, and the float values are level / 225.
OMNIGLOT_LEVELS = 225


def _file_key(path: Path) -> tuple[str, int, int]:
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# ----------------------------------------------------------------------------- IDX

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a read-only uint8 array, e.g. [60000, 28, 28]."""
    return _read_idx_cached(*_file_key(path))


@functools.lru_cache(maxsize=16)
def _read_idx_cached(path: str, size: int, mtime_ns: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable IDX file ({err}); delete it and download "
                         f"it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header says {dims} but holds {len(raw) - offset} bytes; "
                         f"the file is truncated")
    return _readonly(np.frombuffer(raw, np.uint8, offset=offset).reshape(dims))


# ------------------------------------------------------------------ binarized MNIST

def read_binarized_mnist(path: Path) -> np.ndarray:
    """Static binarized MNIST rows as read-only uint8 {0,1} [N, 784] (C order images).

    Accepts the MATLAB file (key `X`, the form in shared/data, sometimes named `.amat`) and
    Larochelle's original text `.amat` (one image per line, 784 space-separated 0/1).
    """
    return _read_binarized_cached(*_file_key(path))


@functools.lru_cache(maxsize=8)
def _read_binarized_cached(path: str, size: int, mtime_ns: int) -> np.ndarray:
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"MATLAB":
        x = scipy.io.loadmat(path)["X"]
    else:
        x = _parse_amat_text(path)
    x = np.ascontiguousarray(x, dtype=np.uint8)
    if x.ndim != 2 or x.shape[1] != IMAGE_PIXELS or x.max(initial=0) > 1:
        raise ValueError(f"{path}: expected [N, 784] binary images, got shape {x.shape}, "
                         f"max {x.max(initial=0)}")
    return _readonly(x)


def _parse_amat_text(path: str) -> np.ndarray:
    """Text `.amat`: whitespace-separated 0/1 digits, one image per line.

    Parsed from the raw bytes (not np.loadtxt) because the training file has 39M numbers.
    """
    buf = np.frombuffer(Path(path).read_bytes(), np.uint8)
    is_digit = (buf == ord("0")) | (buf == ord("1"))
    is_space = (buf == ord(" ")) | (buf == ord("\t")) | (buf == ord("\n")) | (buf == ord("\r"))
    if not np.all(is_digit | is_space):
        bad = int(np.flatnonzero(~(is_digit | is_space))[0])
        raise ValueError(f"{path}: unexpected byte {bytes(buf[bad:bad + 1])!r} at offset {bad}; "
                         f"a text .amat holds only 0/1 digits and whitespace")
    digits = buf[is_digit] - ord("0")
    if digits.size % IMAGE_PIXELS:
        raise ValueError(f"{path}: {digits.size} values is not a whole number of 784-pixel rows")
    return digits.reshape(-1, IMAGE_PIXELS)


# ------------------------------------------------------------------------ Omniglot

def read_chardata(path: Path) -> dict[str, np.ndarray]:
    """Burda et al.'s 28x28 Omniglot `chardata.mat`.

    Returns train_x [24345, 784] / test_x [8070, 784] float32 grey in [0, 1] with rows
    turned into upright C-order images, and per image `*_alphabet` (0..49) and `*_char`
    (character index inside its alphabet, 0-based).

    The file stores images as columns of `data` / `testdata` ([784, N]), each column a
    MATLAB (column-major) 28x28 image, so the row-major view of a row is the transposed
    image; the reference loaders undo this with a Fortran-order reshape, done here as an
    explicit transpose. `target` / `testtarget` are alphabet one-hots [50, N];
    `targetchar` / `testtargetchar` 1-based character indices [1, N].
    """
    m = scipy.io.loadmat(str(path))
    missing = [k for k in ("data", "testdata", "target", "testtarget", "targetchar", "testtargetchar")
               if k not in m]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}; is it Burda's OMNIGLOT chardata.mat?")

    def images(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, np.float32)
        if a.shape[0] != IMAGE_PIXELS:
            raise ValueError(f"{path}: expected [784, N] image columns, got {a.shape}")
        return np.ascontiguousarray(a.T.reshape(-1, 28, 28).transpose(0, 2, 1).reshape(-1, IMAGE_PIXELS))

    return {
        "train_x": images(m["data"]),
        "test_x": images(m["testdata"]),
        "train_alphabet": np.argmax(m["target"], axis=0).astype(np.int64),
        "test_alphabet": np.argmax(m["testtarget"], axis=0).astype(np.int64),
        "train_char": np.asarray(m["targetchar"]).reshape(-1).astype(np.int64) - 1,
        "test_char": np.asarray(m["testtargetchar"]).reshape(-1).astype(np.int64) - 1,
    }


def read_omniglot_npz(path: Path) -> np.ndarray:
    """The 105x105 Omniglot arrays: bool [characters, 20 drawers, 105, 105], True = background."""
    with np.load(path) as f:
        images = f["images"]
    if images.dtype != np.bool_ or images.ndim != 4 or images.shape[1:] != (20, 105, 105):
        raise ValueError(f"{path}: expected bool images [C, 20, 105, 105], got "
                         f"{images.dtype} {images.shape}")
    return images


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] exact area-averaging weights: W[i, j] = overlap of output cell i
    (width n_in / n_out in input pixels) with input pixel j, divided by the cell width.
    Rows sum to 1."""
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale
    hi = lo + scale
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / scale


def omniglot_to_28(background: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """105x105 Omniglot (bool, True = background) -> 28x28 ink levels.

    background: [B, 105, 105] bool. Returns uint8 [B, 784] with values 0..225; the grey
    level (ink = 1) is value / OMNIGLOT_LEVELS, the exact area average of the ink.
    """
    if background.shape[1:] != (105, 105):
        raise ValueError(f"expected [B, 105, 105] images, got {background.shape}")
    # Integer weights (15 * area weight) keep every product and sum exact in float32.
    w = np.rint(area_weights(105, 28) * 15).astype(np.float32)
    assert np.allclose(w.sum(1), 15)
    out = np.empty((background.shape[0], IMAGE_PIXELS), np.uint8)
    for start in range(0, background.shape[0], chunk):
        ink = (~background[start:start + chunk]).astype(np.float32)
        levels = w @ ink @ w.T  # [b, 28, 28], integers 0..225
        out[start:start + chunk] = np.rint(levels).reshape(-1, IMAGE_PIXELS).astype(np.uint8)
    return out
