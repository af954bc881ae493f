"""python -m exvae_dist.ingest: every source kind round-trips, resumes, and is validated;
the store's splits load by config and refuse a store other than the run's."""

import tracemalloc

import numpy as np
import pytest
import torch
import zarr

from exvae_dist import config as config_mod
from exvae_dist.commands import ingest as ingest_command
from exvae_dist.data import ingest as ingest_mod
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
    assert read_ingested(tmp_path / "s")["attrs"]["label_map"] == {c: i for i, c in
                                                                   enumerate(classes)}


def test_class_folders_print_their_label_map(tmp_path, capsys):
    from PIL import Image
    for name in ("zebra", "ant", "cat"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(np.full((6, 5), i, np.uint8)).save(tmp_path / "imgs" / name /
                                                                f"{i}.png")
    assert ingest_command.main([str(tmp_path / "imgs"), str(tmp_path / "s"), "--no-progress"]) == 0
    assert "ant -> 0, cat -> 1, zebra -> 2" in capsys.readouterr().out
    assert '"zebra": 2' in (tmp_path / "s" / "zarr.json").read_text()  # readable in metadata


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


def late(value, dtype=np.float32):
    """300 good rows but one bad value in row 250: past the first 64-row block."""
    x = np.full((300, 4, 4), 0.5, dtype)
    x[250, 1, 1] = value
    return x


@pytest.mark.parametrize("bad, match", [
    (np.full((50, 4, 4), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((50, 4, 4), np.nan, np.float32), "NaN"),
    (np.full((50, 4, 4), 300, np.int64), "0..255"),
    (np.zeros((50, 16), np.uint8), r"\[N, H, W\]"),
    (late(np.nan), r"rows 0\.\.299: images contain NaN"),
    (late(255.0), r"\[0, 1\], got 0\.0\.\.255\.0; divide by 255"),
])
def test_bad_values_and_shapes_are_refused(tmp_path, bad, match):
    """Refused before the store is created, so nothing is left behind."""
    np.save(tmp_path / "x.npy", bad)
    with pytest.raises(ingest_mod.IngestError, match=match):
        run(ingest_mod.open_source(str(tmp_path / "x.npy"), Args()), tmp_path / "s",
            n_valid=5, n_test=5)
    assert not (tmp_path / "s").exists()


def test_channel_last_arrays_are_transposed(tmp_path):
    """Before, (N, 12, 10, 3) was stored as C = 12, W = 3."""
    x = np.random.default_rng(0).integers(0, 256, (200, 12, 10, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    source = ingest_mod.open_source(str(tmp_path / "x.npy"), Args())
    assert source.image_shape == (3, 12, 10)
    run(source, tmp_path / "s", n_valid=10, n_test=10)
    assert ExemplarStore(tmp_path / "s").image_shape == (3, 12, 10)
    assert_round_trip(tmp_path / "s", np.moveaxis(x, -1, 1), None, n_valid=10, n_test=10)


def test_an_ambiguous_channel_axis_is_refused_with_the_fix(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((20, 3, 10, 3), np.uint8))
    with pytest.raises(ingest_mod.IngestError, match=r"could be \[N, C, H, W\] or \[N, H, W, "
                                                     r"C\]; .*np\.moveaxis"):
        ingest_mod.open_source(str(tmp_path / "x.npy"), Args())


def test_a_full_disk_says_the_store_can_be_resumed(tmp_path, monkeypatch, capsys):
    """A clear message that says how to resume (a bare OSError traceback before)."""
    import errno

    from exvae_dist.retrieval.store_ingest import StoreBuilder

    x, _ = make_images(300)
    np.save(tmp_path / "x.npy", x)
    write = StoreBuilder.write_block

    def full_after_one(self, block, images, labels):
        if block >= 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, block, images, labels)

    monkeypatch.setattr(StoreBuilder, "write_block", full_after_one)
    argv = [str(tmp_path / "x.npy"), str(tmp_path / "s"), "--no-progress", "--block-rows", "64",
            "--valid", "10", "--test", "10"]
    assert ingest_command.main(argv) == 2
    err = capsys.readouterr().err
    assert "no space left on device writing" in err and "MiB free" in err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    monkeypatch.setattr(StoreBuilder, "write_block", write)  # space freed: the rerun resumes
    assert ingest_command.main(argv) == 0
    assert_round_trip(tmp_path / "s", x, None, n_valid=10, n_test=10)


def test_exact_duplicates_are_reported_and_dropped_on_request(tmp_path, capsys):
    """Leave-one-out is by row id, so a twin stays in its image's prior."""
    x, _ = make_images(300)
    x[[40, 200, 250]] = x[7]  # three twins of row 7 (training rows unless held out)
    np.save(tmp_path / "x.npy", x)
    source = ingest_mod.open_source(str(tmp_path / "x.npy"), Args())
    run(source, tmp_path / "kept", n_valid=5, n_test=5)
    report = read_ingested(tmp_path / "kept")["attrs"]["duplicates"]
    valid_rows, test_rows = ingest_mod.held_out_rows(300, 5, 5, 0)
    twins = [r for r in (7, 40, 200, 250) if r not in set(valid_rows) | set(test_rows)]
    assert report["count"] == len(twins) - 1
    first = ingest_mod.train_rows(np.arange(290), np.sort(np.concatenate([valid_rows,
                                                                          test_rows])))
    position = {int(r): p for p, r in enumerate(first)}
    assert report["examples"] == [[position[twins[0]], position[r]] for r in twins[1:]]

    run(source, tmp_path / "dropped", n_valid=5, n_test=5, drop_duplicates=True)
    store = ExemplarStore(tmp_path / "dropped")
    assert store.n == 290 - report["count"]
    assert read_ingested(tmp_path / "dropped")["attrs"]["duplicates"]["count"] == 0
    assert len(np.unique(store.images().reshape(store.n, -1), axis=0)) == store.n


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
    monkeypatch.setattr(ingest_command, "ingest", interrupted)
    assert ingest_command.main([str(tmp_path / "x.npy"), str(tmp_path / "s"), "--no-progress"]) == 130
    assert "nothing was written" in capsys.readouterr().err  # stopped before the store began
    (tmp_path / "s").mkdir()
    assert ingest_command.main([str(tmp_path / "x.npy"), str(tmp_path / "s"), "--no-progress"]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_cli_help_explains_sources(capsys):
    with pytest.raises(SystemExit):
        ingest_command.main(["--help"])
    out = capsys.readouterr().out
    assert "deformed-mnist:N" in out and "resumes" in out
    assert "Leave-one-out is by row id" in out and "--drop-duplicates" in out


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


def flip_a_byte(store_path, chunk: int) -> None:
    """One pixel of an images chunk changed in place: only the chunk's CRC32C sees it."""
    [path] = [p for p in (store_path / "images" / "c" / str(chunk)).rglob("*") if p.is_file()]
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])  # held resident; read by id (pread)
def test_a_flipped_image_chunk_stops_the_row_reader_and_names_the_ingest(tmp_path, cache_bytes):
    """Before, RawRows read rows by pread and skipped the chunk's checksum, so the
    Ray trainer trained on flipped pixels. Every chunk it touches is now verified once."""
    x, _ = make_images(500)
    np.save(tmp_path / "x.npy", x)
    run(ingest_mod.open_source(str(tmp_path / "x.npy"), Args()), tmp_path / "s")
    store = ExemplarStore(tmp_path / "s")
    images = StoreImages(store, cache_bytes)
    assert isinstance(images.reader, RawRows)
    assert torch.equal(images[np.array([3, 1])], images[np.array([3, 1])])
    flip_a_byte(tmp_path / "s", chunk=0)
    advice = r"re-run the `python -m exvae_dist.ingest` command"
    with pytest.raises(StoreError, match=r"corrupt: chunk 0 .*CRC32C.*" + advice):
        StoreImages(store, cache_bytes)[np.array([3, 1])]
    with pytest.raises(StoreError, match=advice):
        store.images(np.arange(10))  # the one-process trainer's read names the ingest too


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
    common = ["eval.n_samples=20", "eval.n_test=10",
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
