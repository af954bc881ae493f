"""python -m exvae_dist.ingest: every source kind round-trips, resumes, and is validated;
the store's splits load by config and refuse a store other than the run's."""

import tracemalloc

import numpy as np
import pytest
import torch
import zarr

from exvae_dist import config as config_mod
from exvae_dist.commands import ingest as ingest_mod
from exvae_dist.data import load_dataset
from exvae_dist.data.deformed import deformed_rows
from exvae_dist.data.readers import read_idx
from exvae_dist.data.store_data import StoreMismatchError
from exvae_dist.retrieval.store import (RANDOM_READ_LAYOUT, ExemplarStore, ImageLayout,
                                        StoreError)
from exvae_dist.retrieval.store_ingest import read_ingested
from exvae_dist.retrieval.store_rows import CachedChunkRows, RawRows
from exvae_dist.train.store_images import StoreImages


class Args:
    labels = images_key = labels_key = data_root = None
    seed = 0


def make_images(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 12, 10), dtype=np.uint8), rng.integers(0, 7, n)


def run(source, store, **kw):
    kw.setdefault("n_valid", 40)
    kw.setdefault("n_test", 30)
    kw.setdefault("block_rows", 64)
    return ingest_mod.ingest(source, store, progress=False, **kw)


def assert_round_trip(store, x, y, n_valid=40, n_test=30, split_seed=0):
    d = read_ingested(store)
    valid_rows, test_rows = ingest_mod.held_out_rows(len(x), n_valid, n_test, split_seed)
    train_rows = np.setdiff1d(np.arange(len(x)), np.concatenate([valid_rows, test_rows]))
    assert np.array_equal(d["train"][0].reshape(-1, *x.shape[1:]), x[train_rows])
    assert np.array_equal(d["valid"][0].reshape(-1, *x.shape[1:]), x[valid_rows])
    assert np.array_equal(d["test"][0].reshape(-1, *x.shape[1:]), x[test_rows])
    if y is not None:
        assert np.array_equal(d["train"][1], y[train_rows])
        assert np.array_equal(d["valid"][1], y[valid_rows])
        assert np.array_equal(d["test"][1], y[test_rows])


def test_npy_with_labels_round_trips_exactly(tmp_path):
    x, y = make_images()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    args = Args()
    args.labels = str(tmp_path / "y.npy")
    run(ingest_mod.open_source(str(tmp_path / "x.npy"), args), tmp_path / "s")
    assert_round_trip(tmp_path / "s", x, y)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trips_exactly(tmp_path, compressed):
    x, y = make_images(300)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", images=x, labels=y)
    source = ingest_mod.open_source(str(tmp_path / "d.npz"), Args())
    if not compressed:
        assert isinstance(source.images, np.memmap)
    run(source, tmp_path / "s")
    assert_round_trip(tmp_path / "s", x, y)


def test_float_npy_in_unit_range_is_stored_as_bytes(tmp_path):
    x, _ = make_images(200)
    np.save(tmp_path / "x.npy", x.astype(np.float32) / 255)
    run(ingest_mod.open_source(str(tmp_path / "x.npy"), Args()), tmp_path / "s")
    assert_round_trip(tmp_path / "s", x, None)


def test_image_folder_with_class_subfolders_round_trips(tmp_path):
    from PIL import Image
    x, y = make_images(120)
    for i, (img, label) in enumerate(zip(x, y)):
        folder = tmp_path / "imgs" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    source = ingest_mod.open_source(str(tmp_path / "imgs"), Args())
    # files are read in sorted path order: class folder, then name
    order = sorted(range(len(x)), key=lambda i: (f"class{y[i]}", f"{i:04d}"))
    classes = sorted({f"class{v}" for v in y})
    labels = np.array([classes.index(f"class{y[i]}") for i in order])
    run(source, tmp_path / "s", n_valid=10, n_test=10)
    assert_round_trip(tmp_path / "s", x[order], labels, n_valid=10, n_test=10)
    assert read_ingested(tmp_path / "s")["attrs"]["classes"] == classes


def test_zarr_array_round_trips(tmp_path):
    x, y = make_images(250)
    zarr.create_array(store=str(tmp_path / "x.zarr"), data=x, chunks=(32, 12, 10))
    zarr.create_array(store=str(tmp_path / "y.zarr"), data=y)
    args = Args()
    args.labels = str(tmp_path / "y.zarr")
    run(ingest_mod.open_source(str(tmp_path / "x.zarr"), args), tmp_path / "s")
    assert_round_trip(tmp_path / "s", x, y)


def test_deformed_mnist_rows_regenerate_and_splits_are_mnist(tmp_path, data_dir):
    mnist_dir = data_dir / "mnist"
    n = 50_000 + 40
    source = ingest_mod.DeformedMnistSource(n, seed=3, data_root=str(data_dir))
    run(source, tmp_path / "s", block_rows=8192)
    d = read_ingested(tmp_path / "s")
    train = d["train"][0].reshape(n, 28, 28)
    base = read_idx(mnist_dir / "train-images-idx3-ubyte.gz")
    labels = read_idx(mnist_dir / "train-labels-idx1-ubyte.gz")
    assert np.array_equal(train[:50_000], base[:50_000])  # rows below 50,000: the originals
    rows = np.array([50_000, 50_017, n - 1])
    again, again_y = deformed_rows(base[:50_000], labels[:50_000], rows, seed=3)
    assert np.array_equal(train[rows], again)  # any row regenerates on its own
    assert np.array_equal(d["train"][1][rows], again_y)
    assert not np.array_equal(train[50_000], base[0])
    assert np.array_equal(d["valid"][0].reshape(-1, 28, 28), base[50_000:])
    assert np.array_equal(d["test"][0].reshape(-1, 28, 28),
                          read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz"))


def test_interrupted_ingest_is_refused_then_resumes_to_the_same_store(tmp_path):
    x, y = make_images(600)
    np.save(tmp_path / "x.npy", x)
    source = ingest_mod.open_source(str(tmp_path / "x.npy"), Args())
    assert run(source, tmp_path / "s", stop_after_blocks=3) == ""
    with pytest.raises(StoreError, match="half-written"):
        ExemplarStore(tmp_path / "s")
    cfg = config_mod.load(None, ["data.name=store", f"data.store={tmp_path / 's'}"], env={})
    with pytest.raises(StoreError, match="half-written"):
        load_dataset(cfg.data)
    resumed = run(source, tmp_path / "s")
    whole = run(source, tmp_path / "other")
    assert resumed == whole
    assert_round_trip(tmp_path / "s", x, None)


def test_resuming_from_another_source_is_refused(tmp_path):
    x, _ = make_images(600)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", x[::-1].copy())
    run(ingest_mod.open_source(str(tmp_path / "a.npy"), Args()), tmp_path / "s",
        stop_after_blocks=1)
    with pytest.raises(StoreError, match="another source"):
        run(ingest_mod.open_source(str(tmp_path / "b.npy"), Args()), tmp_path / "s")


@pytest.mark.parametrize("bad, match", [
    (np.full((50, 4, 4), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((50, 4, 4), np.nan, np.float32), "NaN"),
    (np.full((50, 4, 4), 300, np.int64), "0..255"),
    (np.zeros((50, 16), np.uint8), r"\[N, H, W\]"),
])
def test_bad_values_and_shapes_are_refused(tmp_path, bad, match):
    np.save(tmp_path / "x.npy", bad)
    with pytest.raises(ingest_mod.IngestError, match=match):
        run(ingest_mod.open_source(str(tmp_path / "x.npy"), Args()), tmp_path / "s",
            n_valid=5, n_test=5)


def test_labels_of_the_wrong_length_are_refused(tmp_path):
    x, y = make_images(100)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y[:-1])
    args = Args()
    args.labels = str(tmp_path / "y.npy")
    with pytest.raises(ingest_mod.IngestError, match="labels"):
        ingest_mod.open_source(str(tmp_path / "x.npy"), args)


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    x, _ = make_images(50)
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(ingest_mod, "ingest", interrupted)
    assert ingest_mod.main([str(tmp_path / "x.npy"), str(tmp_path / "s"), "--no-progress"]) == 130
    assert "nothing was written" in capsys.readouterr().err  # stopped before the store began
    (tmp_path / "s").mkdir()
    assert ingest_mod.main([str(tmp_path / "x.npy"), str(tmp_path / "s"), "--no-progress"]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_cli_help_explains_sources(capsys):
    with pytest.raises(SystemExit):
        ingest_mod.main(["--help"])
    out = capsys.readouterr().out
    assert "deformed-mnist:N" in out and "resumes" in out


def test_store_data_loads_by_config_and_refuses_another_store(tmp_path):
    x, y = make_images(400)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x2.npy", x[::-1].copy())
    run(ingest_mod.open_source(str(tmp_path / "x.npy"), Args()), tmp_path / "s")
    run(ingest_mod.open_source(str(tmp_path / "x2.npy"), Args()), tmp_path / "s2")
    cfg = config_mod.load(None, ["data.name=store", f"data.store={tmp_path / 's'}"], env={})
    splits = load_dataset(cfg.data)
    assert splits.train_x.shape == (330, 120) and splits.dynamic
    assert set(np.unique(splits.test_x)) <= {0.0, 1.0}
    recorded = cfg.data.store_fingerprint
    assert recorded  # the run's config now names its store
    cfg.data.store = str(tmp_path / "s2")  # evaluating the run against other data
    with pytest.raises(StoreMismatchError, match="trained on store"):
        load_dataset(cfg.data)


def test_store_name_without_path_is_a_config_error():
    with pytest.raises(config_mod.ConfigError, match="data.store"):
        config_mod.load(None, ["data.name=store"], env={})


# --------------------------------------------------------------- store-backed images

@pytest.mark.parametrize("layout", [RANDOM_READ_LAYOUT, ImageLayout(chunk_rows=64),
                                    ImageLayout(chunk_rows=16, shard_rows=128)])
def test_store_images_match_stored_images(tmp_path, layout):
    x, _ = make_images(1000)
    store = ExemplarStore.create(tmp_path / "s", x, 4, chunk_rows=256, image_layout=layout)
    images = StoreImages(store, cache_bytes=64 * 120 * 3)
    assert isinstance(images.reader, RawRows if not layout.compress else CachedChunkRows) \
        or layout.chunk_rows != 8192
    expect = torch.from_numpy(x.reshape(1000, -1)).float() / 255
    ids = np.random.default_rng(1).integers(0, 1000, 300)
    for _ in range(2):  # second pass partly from the cache
        assert torch.equal(images[ids], expect[ids])
        assert torch.equal(images[torch.from_numpy(ids)], expect[ids])
    assert torch.equal(images[250:700], expect[250:700])
    assert len(images) == 1000 and images.shape == (1000, 120)
    if isinstance(images.reader, CachedChunkRows):
        assert len(images.reader._cache) <= images.reader.max_chunks


def _peak_bytes_reading(tmp_path, n):
    x = np.random.default_rng(n).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
    store = ExemplarStore.create(tmp_path / f"s{n}", x, 4, chunk_rows=8192,
                                 image_layout=RANDOM_READ_LAYOUT)
    del x
    store = ExemplarStore(tmp_path / f"s{n}")
    ids = np.random.default_rng(0).integers(0, n, 1100)
    tracemalloc.start()
    images = StoreImages(store, cache_bytes=4 << 20)  # below N x D: read by id
    for _ in range(3):
        batch = images[ids]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert torch.equal(batch, torch.from_numpy(store.images(ids).reshape(1100, -1)).float() / 255)
    return peak


def test_store_images_allocate_nothing_of_size_n(tmp_path):
    small, large = _peak_bytes_reading(tmp_path, 10_000), _peak_bytes_reading(tmp_path, 100_000)
    # 1,100 rows as uint8 + float32 is ~4.3 MB; all of N = 100,000 would be 78 MB (uint8)
    assert large < 8e6, large
    assert large < 2 * small + 1e6, (small, large)


def test_store_images_within_the_bound_are_read_once_into_memory(tmp_path):
    x, _ = make_images(500)
    store = ExemplarStore.create(tmp_path / "s", x, 4, chunk_rows=128,
                                 image_layout=RANDOM_READ_LAYOUT)
    images = StoreImages(store, cache_bytes=500 * 120)
    assert images.resident is not None and images.resident.shape == (500, 120)
    expect = torch.from_numpy(x.reshape(500, -1)).float() / 255
    ids = np.array([499, 0, 7, 7])
    assert torch.equal(images[ids], expect[ids])
    assert torch.equal(images[torch.from_numpy(ids)], expect[ids])
    assert torch.equal(images[10:20], expect[10:20])
    assert StoreImages(store, cache_bytes=500 * 120 - 1).resident is None


@pytest.mark.slow
def test_run_trained_on_a_store_evaluates_on_its_test_split_and_refuses_another(
        tmp_path, data_dir, monkeypatch, capsys):
    from exvae_dist.commands.evaluate import main as evaluate
    from exvae_dist.train.local import fit

    x = read_idx(data_dir / "mnist" / "train-images-idx3-ubyte.gz")[:700]
    y = read_idx(data_dir / "mnist" / "train-labels-idx1-ubyte.gz")[:700]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    args = Args()
    args.labels = str(tmp_path / "y.npy")
    run(ingest_mod.open_source(str(tmp_path / "x.npy"), args), tmp_path / "s",
        n_valid=100, n_test=60)
    np.save(tmp_path / "x2.npy", x[::-1].copy())
    run(ingest_mod.open_source(str(tmp_path / "x2.npy"), Args()), tmp_path / "s2",
        n_valid=100, n_test=60)
    root = tmp_path / "runs"
    cfg = config_mod.load("smoke", [f"train.run_dir={root}", "train.epochs=1",
                                    "train.max_steps_per_epoch=5", "train.progress=false",
                                    "train.threads=1", "tracking.sample_grid=false",
                                    "data.name=store", f"data.store={tmp_path / 's'}",
                                    "data.n_train=null", "data.n_valid=null",
                                    "data.n_test=null"], env={})
    fit(cfg)
    run_dir = cfg.run_path()
    monkeypatch.setenv("EXVAE_DATA_DIR", str(data_dir))
    common = ["eval.n_samples=20", "eval.n_test=10", "eval.sample_chunk=20",
              "eval.pictures=false", "eval.knn_ks=[1,3]"]
    assert evaluate([str(run_dir), *common, "eval.name=store_test"]) == 0
    summary = (run_dir / "eval" / "store_test" / "summary.json").read_text()
    assert '"log_likelihood"' in summary
    # the run's checkpoint recorded its store: evaluating it on other data is refused
    with pytest.raises(StoreMismatchError, match="trained on store"):
        evaluate([str(run_dir), *common, f"data.store={tmp_path / 's2'}"])


def test_deformation_resampling_matches_scipy_map_coordinates():
    from scipy import ndimage

    from exvae_dist.data.deformed import _bilinear
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    sy, sx = rng.uniform(-3, 31, (2, 4, 28, 28))
    sy[0, 0, :4] = [-1.0, 27.0, 27.5, 28.0]  # on and just past the edges  # some samples fall outside the image
    expect = np.stack([ndimage.map_coordinates(images[i].astype(np.float64), [sy[i], sx[i]],
                                               order=1, mode="grid-constant", cval=0.0,
                                               prefilter=False) for i in range(4)])
    np.testing.assert_allclose(_bilinear(images, sy, sx), expect, atol=1e-3)
