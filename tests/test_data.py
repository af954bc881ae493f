"""exvae_dist.data on the real files in shared/data: splits, binarization, checksums,
download (local file:// and injected fetchers only: no network), Omniglot 28x28."""

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from exvae_dist.config import DataConfig
from exvae_dist.data import (ChecksumMismatchError, DataFileMissingError, download_file,
                             dynamic_binarize, load_dataset, verify_file)
from exvae_dist.data import datasets as ds
from exvae_dist.data import sources
from exvae_dist.data.readers import (area_weights, omniglot_to_28, read_binarized_mnist,
                                     read_chardata, read_idx)


def cfg(data_dir, name="mnist", **kw):
    return DataConfig(name=name, root=str(data_dir), download=False, **kw)


@pytest.fixture(scope="module")
def mnist(data_dir):
    return load_dataset(cfg(data_dir))


@pytest.fixture(scope="module")
def mnist_raw(data_dir):
    folder = data_dir / "mnist"
    return (read_idx(folder / "train-images-idx3-ubyte.gz").reshape(60000, 784),
            read_idx(folder / "train-labels-idx1-ubyte.gz"))


def copy_folder(src: Path, dst: Path) -> Path:
    """The dataset files of `src`, without what runs leave beside them (the hidden checksum
    sidecar .exvae_verified.json and temp files), so a copy is what a fresh download holds."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.startswith("."):
            shutil.copy(f, dst / f.name)
    return dst


# ------------------------------------------------------------------ MNIST family

def test_mnist_splits_follow_method_section_4(mnist, mnist_raw):
    raw_x, raw_y = mnist_raw
    assert mnist.train_x.shape == (50000, 784) and mnist.valid_x.shape == (10000, 784)
    assert mnist.test_x.shape == (10000, 784)
    assert mnist.dynamic and mnist.image_shape == (1, 28, 28)
    assert all(a.dtype == np.float32 for a in (mnist.train_x, mnist.valid_x, mnist.test_x))
    assert all(a.dtype == np.int64 for a in (mnist.train_y, mnist.valid_y, mnist.test_y))
    # Training images are the first 50,000, grey, exactly pixel / 255.
    np.testing.assert_array_equal(mnist.train_x, raw_x[:50000] / np.float32(255))
    np.testing.assert_array_equal(mnist.train_y, raw_y[:50000])
    assert len(np.unique(mnist.train_x)) > 200
    # Validation is the last 10,000, binarized: never 1 on black, never 0 on full white.
    np.testing.assert_array_equal(mnist.valid_y, raw_y[50000:])
    assert set(np.unique(mnist.valid_x)) == {0.0, 1.0} and set(np.unique(mnist.test_x)) == {0.0, 1.0}
    assert mnist.valid_x[raw_x[50000:] == 0].max() == 0
    assert mnist.valid_x[raw_x[50000:] == 255].min() == 1
    assert mnist.test_y[0] == 7
    np.testing.assert_array_equal(np.bincount(mnist.test_y),
                                  [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


def test_binarization_mean_matches_grey_mean(mnist, mnist_raw):
    grey = mnist_raw[0][50000:] / 255.0
    # 7.84M Bernoulli draws: the mean's std is ~1.2e-4; 2e-3 is > 15 sigma.
    assert abs(mnist.valid_x.mean() - grey.mean()) < 2e-3
    # Per pixel, over many fresh draws, P(1) is the grey level.
    x = np.linspace(0, 1, 11, dtype=np.float32)
    draws = dynamic_binarize(np.broadcast_to(x, (20000, 11)), np.random.default_rng(0))
    assert draws.dtype == np.float32 and set(np.unique(draws)) == {0.0, 1.0}
    np.testing.assert_allclose(draws.mean(0), x, atol=0.015)


def test_evaluation_binarization_is_fixed_by_the_seed(data_dir, mnist):
    again = load_dataset(cfg(data_dir))
    np.testing.assert_array_equal(again.valid_x, mnist.valid_x)
    np.testing.assert_array_equal(again.test_x, mnist.test_x)
    other = load_dataset(cfg(data_dir, binarize_seed=1))
    assert (other.valid_x != mnist.valid_x).mean() > 0.01
    assert (other.test_x != mnist.test_x).mean() > 0.01
    np.testing.assert_array_equal(other.train_x, mnist.train_x)  # grey training set unchanged
    # Validation and test draw from different random streams of the same seed.
    half = np.full((100, 784), 0.5, np.float32)
    assert (ds.binarize_once(half, 0, 1) != ds.binarize_once(half, 0, 2)).mean() > 0.4


def test_n_train_valid_test_take_the_first_images(data_dir, mnist):
    small = load_dataset(cfg(data_dir, n_train=100, n_valid=30, n_test=20))
    np.testing.assert_array_equal(small.train_x, mnist.train_x[:100])
    np.testing.assert_array_equal(small.valid_x, mnist.valid_x[:30])  # same binarization
    np.testing.assert_array_equal(small.test_x, mnist.test_x[:20])
    np.testing.assert_array_equal(small.test_y, mnist.test_y[:20])
    with pytest.raises(ValueError, match="data.n_test=20000"):
        load_dataset(cfg(data_dir, n_test=20000))


def test_fashion_mnist_splits(data_dir):
    f = load_dataset(cfg(data_dir, "fashion_mnist"))
    assert f.train_x.shape == (50000, 784) and f.valid_x.shape == (10000, 784)
    assert f.test_x.shape == (10000, 784) and f.dynamic
    assert 0 <= f.train_x.min() and f.train_x.max() == 1.0 and len(np.unique(f.train_x)) > 200
    assert set(np.unique(f.test_x)) == {0.0, 1.0}
    np.testing.assert_array_equal(np.bincount(f.test_y), [1000] * 10)
    assert np.bincount(f.train_y).sum() == 50000 and f.train_y.max() == 9
    assert abs(f.test_x.mean() - 0.2868) < 3e-3  # README: test mean grey 0.2868


def test_binarized_mnist_is_static_and_unlabelled(data_dir):
    b = load_dataset(cfg(data_dir, "binarized_mnist"))
    assert (b.train_x.shape, b.valid_x.shape, b.test_x.shape) == ((50000, 784), (10000, 784), (10000, 784))
    assert not b.dynamic and b.train_y is None and b.valid_y is None and b.test_y is None
    for x in (b.train_x, b.valid_x, b.test_x):
        assert x.dtype == np.float32 and set(np.unique(x)) == {0.0, 1.0}
    assert abs(b.train_x.mean() - 0.1306) < 1e-3


def test_amat_text_and_mislabelled_matlab_amat_read_alike(data_dir, tmp_path):
    ref = read_binarized_mnist(data_dir / "binarized_mnist" / "binarized_mnist_test.mat")
    text = tmp_path / "binarized_mnist_test.amat"
    text.write_text("".join(" ".join(map(str, row)) + " \n" for row in ref[:37]))
    np.testing.assert_array_equal(read_binarized_mnist(text), ref[:37])
    mat_named_amat = tmp_path / "copy.amat"  # ARM-gradient's naming of the MATLAB file
    shutil.copy(data_dir / "binarized_mnist" / "binarized_mnist_test.mat", mat_named_amat)
    np.testing.assert_array_equal(read_binarized_mnist(mat_named_amat), ref)
    text.write_text("0 1 2\n")
    with pytest.raises(ValueError, match="unexpected byte"):
        read_binarized_mnist(text)


def test_truncated_idx_file_is_reported(tmp_path):
    bad = tmp_path / "t.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + bytes(50))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(bad)


# ------------------------------------------------------- checksums and download

def test_checksum_mismatch_names_file_and_both_hashes(data_dir, tmp_path):
    folder = copy_folder(data_dir / "mnist", tmp_path / "mnist")
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    verify_file(labels, sources.MNIST["test_labels"].sha256)  # fine, and now remembered
    data = bytearray(labels.read_bytes())
    data[-1] ^= 0xFF
    labels.write_bytes(bytes(data))
    os.utime(labels, ns=(1, 1))  # a new mtime: the remembered verification no longer applies
    with pytest.raises(ChecksumMismatchError) as err:
        load_dataset(cfg(tmp_path))
    msg = str(err.value)
    assert str(labels) in msg and sources.MNIST["test_labels"].sha256 in msg
    import hashlib
    assert hashlib.sha256(bytes(data)).hexdigest() in msg


def test_verification_is_remembered_in_a_sidecar(data_dir, tmp_path):
    folder = copy_folder(data_dir / "binarized_mnist", tmp_path / "binarized_mnist")
    load_dataset(cfg(tmp_path, "binarized_mnist"))
    sidecar = (folder / ".exvae_verified.json").read_text()
    for remote in sources.BINARIZED_MNIST.values():
        assert remote.name in sidecar and remote.sha256 in sidecar


def test_read_only_data_folder_gets_no_sidecar_or_cache(mnist, data_dir, tmp_path):
    # Loaded above from data_dir; a folder without write bits must stay untouched (even for root).
    if not ds.writable_dir(data_dir / "mnist"):
        assert not (data_dir / "mnist" / ".exvae_verified.json").exists()
    ro = copy_folder(data_dir / "binarized_mnist", tmp_path / "binarized_mnist")
    ro.chmod(0o555)
    try:
        assert not ds.writable_dir(ro)
        load_dataset(cfg(tmp_path, "binarized_mnist"))
        assert not (ro / ".exvae_verified.json").exists()
    finally:
        ro.chmod(0o755)


def test_missing_file_offline_says_where_and_how_to_fix(data_dir, tmp_path):
    folder = copy_folder(data_dir / "mnist", tmp_path / "mnist")
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataFileMissingError) as err:
        load_dataset(cfg(tmp_path))
    msg = str(err.value)
    for needle in ("train-labels-idx1-ubyte.gz", str(folder), "data.root", "EXVAE_DATA_DIR",
                   "data.download=true"):
        assert needle in msg


def test_download_from_file_url_is_verified_and_atomic(data_dir, tmp_path):
    real = sources.MNIST["test_labels"]
    src = data_dir / "mnist" / real.name
    remote = sources.RemoteFile(real.name, real.size, real.sha256,
                                ((tmp_path / "nowhere.gz").as_uri(), src.as_uri()))
    dest = tmp_path / "root" / "mnist"
    path = download_file(remote, dest)  # first mirror fails, the second serves good bytes
    assert path == dest / real.name and path.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == [".exvae_verified.json", real.name]

    # Wrong bytes: ChecksumMismatchError, nothing under the final name, no temp file left.
    wrong = sources.RemoteFile("other.gz", real.size, real.sha256,
                               ((data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").as_uri(),))
    with pytest.raises(ChecksumMismatchError, match=real.sha256):
        download_file(wrong, dest)
    assert not (dest / "other.gz").exists()
    assert not [p for p in dest.iterdir() if ".part" in p.name]


def test_failed_download_leaves_nothing_and_names_the_file(tmp_path):
    def broken(url, dest):
        Path(dest).write_bytes(b"half a file")
        raise OSError("connection reset")

    remote = sources.MNIST["train_labels"]
    with pytest.raises(DataFileMissingError) as err:
        download_file(remote, tmp_path, fetch=broken)
    assert remote.name in str(err.value) and "connection reset" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_load_dataset_downloads_missing_files_with_injected_fetch(data_dir, tmp_path):
    urls = []

    def fetch(url, dest):  # serves the shared copy for whatever mirror is asked
        urls.append(url)
        shutil.copy(data_dir / "mnist" / url.rsplit("/", 1)[1], dest)

    s = load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=True, n_train=10),
                     fetch=fetch)
    assert s.test_y[0] == 7 and s.train_x.shape == (10, 784)
    assert len(urls) == 4 and all(u.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/")
                                  for u in urls)
    assert {p.name for p in (tmp_path / "mnist").glob("*.gz")} == set(sources.IDX_NAMES.values())


# ------------------------------------------------------------------- Omniglot

@pytest.fixture(scope="module")
def omniglot_dir(data_dir, tmp_path_factory):
    """A writable data root whose omniglot/ links to the shared 105x105 arrays."""
    root = tmp_path_factory.mktemp("omni_root")
    (root / "omniglot").mkdir()
    for remote in sources.OMNIGLOT_NPZ.values():
        os.symlink(data_dir / "omniglot" / remote.name, root / "omniglot" / remote.name)
    return root


@pytest.fixture(scope="module")
def omniglot(omniglot_dir):
    return load_dataset(cfg(omniglot_dir, "omniglot"))


def test_omniglot_28_sizes_labels_and_ink(omniglot):
    o = omniglot
    assert (o.train_x.shape, o.valid_x.shape, o.test_x.shape) == ((23000, 784), (1345, 784), (8115, 784))
    assert o.dynamic and "not Burda" in o.note
    assert 0 <= o.train_x.min() and o.train_x.max() <= 1 and len(np.unique(o.train_x)) > 50
    assert set(np.unique(o.test_x)) == {0.0, 1.0}
    # Every character: 15 drawers in train + validation, 5 in test.
    np.testing.assert_array_equal(np.bincount(np.concatenate([o.train_y, o.valid_y]), minlength=1623),
                                  np.full(1623, 15))
    np.testing.assert_array_equal(np.bincount(o.test_y, minlength=1623), np.full(1623, 5))
    # Ink is 1 and sparse: ~8% of the 105x105 pixels are strokes (README), kept by area averaging.
    assert 0.06 < o.train_x.mean() < 0.11
    assert 0.06 < o.test_x.mean() < 0.11
    # Border pixels are mostly background.
    border = o.train_x.reshape(-1, 28, 28)[:, [0, -1], :].mean()
    assert border < 0.02


def test_omniglot_downsampling_is_an_exact_area_average(data_dir):
    with np.load(data_dir / "omniglot" / "images_evaluation.npz") as f:
        img = f["images"][:3, 0]  # [3, 105, 105], True = background
    ink = (~img).astype(np.float64)
    # Brute force: 4x nearest upsampling -> 420 = 28 * 15 pixels; mean over 15x15 blocks.
    up = ink.repeat(4, axis=1).repeat(4, axis=2)
    brute = up.reshape(3, 28, 15, 28, 15).mean(axis=(2, 4)).reshape(3, 784)
    np.testing.assert_allclose(omniglot_to_28(img) / 225.0, brute, atol=1e-12)
    np.testing.assert_allclose(area_weights(105, 28).sum(1), 1.0)


def test_omniglot_split_is_fixed_and_disjoint(omniglot, omniglot_dir):
    again = load_dataset(cfg(omniglot_dir, "omniglot", binarize_seed=5))  # from the cache
    np.testing.assert_array_equal(again.train_x, omniglot.train_x)
    np.testing.assert_array_equal(again.valid_y, omniglot.valid_y)
    assert (again.valid_x != omniglot.valid_x).any()  # only the binarization moved


def test_omniglot_cache_is_written_and_used_without_sources(omniglot, omniglot_dir, tmp_path):
    cache = omniglot_dir / "omniglot" / ds.OMNIGLOT_CACHE
    assert cache.is_file()
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(f".{ds.OMNIGLOT_CACHE}")]
    alone = tmp_path / "omniglot"
    alone.mkdir()
    shutil.copy(cache, alone / cache.name)  # no npz sources beside it
    o = load_dataset(cfg(tmp_path, "omniglot"))
    np.testing.assert_array_equal(o.train_x, omniglot.train_x)
    np.testing.assert_array_equal(o.test_x, omniglot.test_x)


def test_omniglot_missing_sources_offline(tmp_path):
    with pytest.raises(DataFileMissingError, match="images_background.npz"):
        load_dataset(cfg(tmp_path, "omniglot"))


def test_chardata_columns_are_matlab_images_turned_upright(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.random((6, 28, 28)).astype(np.float32)
    test = rng.random((4, 28, 28)).astype(np.float32)
    # MATLAB stores a 28x28 image column-major: a column of `data` is the image in F order.
    mat = {
        "data": np.stack([im.ravel(order="F") for im in train], 1),
        "testdata": np.stack([im.ravel(order="F") for im in test], 1),
        "target": np.eye(50)[:, [0, 0, 1, 1, 1, 3]],
        "testtarget": np.eye(50)[:, [0, 1, 3, 3]],
        "targetchar": np.array([[1, 2, 1, 2, 3, 1]]),
        "testtargetchar": np.array([[2, 3, 1, 1]]),
    }
    path = tmp_path / "chardata.mat"
    scipy.io.savemat(path, mat)
    d = read_chardata(path)
    np.testing.assert_array_equal(d["train_x"], train.reshape(6, 784))
    np.testing.assert_array_equal(d["test_x"], test.reshape(4, 784))
    _, train_y, _, test_y = ds._omniglot_from_chardata(path)
    # (alphabet, char) pairs ranked: (0,0)=0 (0,1)=1 (1,0)=2 (1,1)=3 (1,2)=4 (3,0)=5
    np.testing.assert_array_equal(train_y, [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(test_y, [1, 4, 5, 5])
