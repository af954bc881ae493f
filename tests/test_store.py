"""The Zarr exemplar store: versions visible only when complete, chunk-aligned writers."""

import json
import logging
import multiprocessing as mp

import numpy as np
import pytest

from exvae_dist.retrieval.store import ExemplarStore, StoreError, chunk_aligned_range

N, D, CHUNK = 1000, 6, 128


def make_store(tmp_path, n=N, chunk=CHUNK):
    images = (np.arange(n * 4 * 4) % 251).astype(np.uint8).reshape(n, 4, 4)
    return ExemplarStore.create(tmp_path / "store.zarr", images, latent_dim=D, chunk_rows=chunk)


def table(version, n=N):
    return (np.arange(n * D, dtype=np.float32).reshape(n, D) + 1000.0 * version)


def write_version(store, version, latents):
    store.begin_version(version)
    store.write_rows(version, 0, latents)
    store.mark_complete(version)


def _writer(path, version, worker, n_workers):
    store = ExemplarStore(path)
    start, stop = store.row_range(worker, n_workers)
    if stop > start:
        store.write_rows(version, start, table(version)[start:stop])


def test_images_roundtrip_and_fancy_rows(tmp_path):
    store = make_store(tmp_path)
    again = ExemplarStore(tmp_path / "store.zarr")
    full = again.images()
    assert full.shape == (N, 4, 4) and full.dtype == np.uint8
    rows = np.array([7, 3, 7, 999])
    np.testing.assert_array_equal(store.images(rows), full[rows])
    with pytest.raises(IndexError):
        store.images(np.array([N]))


def test_missing_store_path_says_how_to_create_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no exemplar store at .*nope.*ExemplarStore.create"):
        ExemplarStore(tmp_path / "nope")


def test_create_refuses_non_uint8_images(tmp_path):
    with pytest.raises(StoreError, match="uint8"):
        ExemplarStore.create(tmp_path / "s.zarr", np.zeros((3, 2), np.float32), 4)


@pytest.mark.parametrize("n,chunk,workers", [(1000, 128, 2), (1000, 128, 3), (100, 128, 2),
                                             (1024, 128, 8), (5, 1, 7)])
def test_row_ranges_tile_rows_on_chunk_boundaries(n, chunk, workers):
    ranges = [chunk_aligned_range(w, workers, n, chunk) for w in range(workers)]
    covered = np.zeros(n, int)
    for start, stop in ranges:
        assert start % chunk == 0 and (stop % chunk == 0 or stop == n)
        covered[start:stop] += 1
    assert (covered == 1).all()


def test_two_writer_processes_fill_disjoint_ranges_and_lose_no_row(tmp_path):
    store = make_store(tmp_path)
    store.begin_version(1)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(store.path), 1, w, 2)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store.mark_complete(1)
    np.testing.assert_array_equal(store.read_latents(1), table(1))


def test_unaligned_write_is_refused(tmp_path):
    store = make_store(tmp_path)
    store.begin_version(1)
    with pytest.raises(StoreError, match="not chunk-aligned.*row_range"):
        store.write_rows(1, 10, table(1)[10:200])
    store.write_rows(1, 896, table(1)[896:])  # the short last chunk ends at N: fine


def test_incomplete_version_is_never_visible(tmp_path, caplog):
    store = make_store(tmp_path)
    write_version(store, 1, table(1))
    store.begin_version(2)
    store.write_rows(2, 0, table(2)[:256])  # a refresh that crashed half way
    with pytest.raises(StoreError, match="only 2 of 8 chunks written"):
        store.mark_complete(2)
    with caplog.at_level(logging.WARNING):
        assert store.latest_complete() == 1
    assert "skipping latent version 2" in caplog.text and "not marked complete" in caplog.text
    with pytest.raises(StoreError, match="not marked complete"):
        store.read_latents(2)
    np.testing.assert_array_equal(store.read_latents(store.latest_complete()), table(1))


def test_version_marked_complete_but_missing_a_chunk_is_skipped(tmp_path, caplog):
    store = make_store(tmp_path)
    write_version(store, 1, table(1))
    write_version(store, 2, table(2))
    chunk_file = next((store.path / "latents" / "v000002" / "c").rglob("*"))
    while chunk_file.is_dir():
        chunk_file = next(chunk_file.iterdir())
    chunk_file.unlink()  # damage after completion
    with caplog.at_level(logging.WARNING):
        assert store.latest_complete() == 1
    assert "chunks written" in caplog.text


def test_version_with_wrong_shape_metadata_is_skipped(tmp_path, caplog):
    store = make_store(tmp_path)
    write_version(store, 1, table(1))
    write_version(store, 2, table(2))
    meta_path = store.path / "latents" / "v000002" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [N, D + 1]
    meta_path.write_text(json.dumps(meta))
    reopened = ExemplarStore(store.path)
    with caplog.at_level(logging.WARNING):
        assert reopened.latest_complete() == 1
    assert "expected (1000, 6) float32" in caplog.text


def test_complete_versions_are_immutable(tmp_path):
    store = make_store(tmp_path)
    write_version(store, 1, table(1))
    with pytest.raises(StoreError, match="immutable"):
        store.begin_version(1)
    with pytest.raises(StoreError, match="immutable"):
        store.write_rows(1, 0, table(1))


def test_nan_latents_are_refused(tmp_path):
    store = make_store(tmp_path)
    store.begin_version(1)
    bad = table(1)
    bad[3, 2] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        store.write_rows(1, 0, bad)


def test_prune_keeps_newest_complete_and_in_progress_versions(tmp_path):
    store = make_store(tmp_path, n=64, chunk=64)
    for v in range(1, 6):
        write_version(store, v, table(v, n=64))
    store.begin_version(6)  # in progress: must survive
    assert store.prune(keep=2) == [1, 2, 3]
    assert store.versions() == [4, 5, 6]
    store.begin_version(7)
    store.write_rows(7, 0, table(7, n=64))
    store.mark_complete(7, keep=1)
    assert store.versions() == [7]  # 6 was abandoned (older than the newest complete)
    np.testing.assert_array_equal(store.read_latents(7), table(7, n=64))


# ------------------------------------------------ integrity: checksums, verified versions, claims

def _chunk_files(store, version):
    return sorted(p for p in (store.path / "latents" / f"v{version:06d}" / "c").rglob("*")
                  if p.is_file())


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_torn_or_zeroed_chunk_of_the_newest_version_falls_back_to_the_previous(
        tmp_path, caplog, damage):
    store = make_store(tmp_path)
    write_version(store, 1, table(1))
    write_version(store, 2, table(2))
    chunk = _chunk_files(store, 2)[3]
    data = chunk.read_bytes()
    # a torn write, or a chunk overwritten with zeros of the same size (no length change)
    chunk.write_bytes(data[:len(data) // 2] if damage == "truncate" else bytes(len(data)))
    reopened = ExemplarStore(store.path)  # a resumed run or a restarted service
    with caplog.at_level(logging.WARNING):
        assert reopened.latest_complete() == 1
        assert reopened.complete_versions() == [1]
    assert "skipping latent version 2" in caplog.text and "corrupt" in caplog.text
    with pytest.raises(StoreError, match="latent version 2 .* corrupt"):
        reopened.read_latents(2)
    np.testing.assert_array_equal(reopened.read_latents(reopened.latest_complete()), table(1))


def test_a_version_with_a_corrupt_chunk_cannot_be_marked_complete(tmp_path):
    store = make_store(tmp_path)
    store.begin_version(1)
    store.write_rows(1, 0, table(1))
    chunk = _chunk_files(store, 1)[0]
    chunk.write_bytes(bytes(chunk.stat().st_size))
    with pytest.raises(StoreError, match="cannot mark latent version 1 complete: .*corrupt"):
        store.mark_complete(1)


def test_corrupt_image_chunk_is_an_error_not_other_images(tmp_path):
    store = make_store(tmp_path)
    chunk = sorted(p for p in (store.path / "images" / "c").rglob("*") if p.is_file())[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the compressed chunk
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="exemplar images .* corrupt"):
        ExemplarStore(store.path).images()


def test_another_writers_incomplete_version_is_never_reused(tmp_path):
    from exvae_dist.retrieval.store import VersionClaimed

    store = make_store(tmp_path)
    store.begin_version(1, owner="run-a")
    store.begin_version(1, owner="run-a")  # the same writer again: fine
    with pytest.raises(VersionClaimed, match="claimed by 'run-a'"):
        store.begin_version(1, owner="run-b")
    assert store.claim_version(1, owner="run-b") == 2
    # a writer that has claimed v3 (its folder made) but not yet written the table's metadata
    (store.path / "latents" / "v000003").mkdir()
    with pytest.raises(VersionClaimed, match="claimed by another writer"):
        store.begin_version(3, owner="run-b")
    store.write_rows(2, 0, table(2))
    store.mark_complete(2)
    np.testing.assert_array_equal(store.read_latents(2), table(2))


def _claimer(path, owner, count, queue):
    store = ExemplarStore(path)
    queue.put((owner, [store.claim_version(1, owner=owner) for _ in range(count)]))


def test_concurrent_writers_never_claim_the_same_version(tmp_path):
    store = make_store(tmp_path, n=64, chunk=64)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(store.path), f"w{i}", 6, queue))
             for i in range(2)]
    for p in procs:
        p.start()
    by_owner = dict(queue.get(timeout=60) for _ in procs)  # in the order they finished
    claimed = [by_owner["w0"], by_owner["w1"]]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    everything = claimed[0] + claimed[1]
    assert len(set(everything)) == 12, claimed
    owners = {v: json.loads((store.path / "latents" / f"v{v:06d}" / "zarr.json").read_text())
              ["attributes"]["owner"] for v in everything}
    for i, mine in enumerate(claimed):
        assert all(owners[v] == f"w{i}" for v in mine)
