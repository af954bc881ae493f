"""The index holder (pure threads) and the Ray IndexService actor around it."""

import contextlib
import dataclasses
import functools
import threading
import time

import numpy as np
import pytest

from exvae_dist.config import IndexConfig
from brute_force import brute_force_knn
from exvae_dist.retrieval.service import IndexHolder, IndexNotReady, start_index_service
from exvae_dist.retrieval.store import ExemplarStore, StoreError

N, D, K = 2000, 8, 5


def served(handle, version, timeout):
    """The workers' one wait for an index version (ShardedSearch.wait_served)."""
    from exvae_dist.train.service_client import ShardedSearch

    return ShardedSearch([handle]).wait_served(version, timeout=timeout)
CFG = IndexConfig(kind="flat", service_threads=1)


def base_latents():
    return np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)


def latents_of(version):
    """Version v = base + v * offset: every version has its own answer to the same query."""
    offset = np.zeros(D, np.float32)
    offset[0] = 0.37
    return base_latents() + version * offset


QUERIES = np.random.default_rng(1).standard_normal((16, D)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def expected(version):
    return brute_force_knn(latents_of(version), QUERIES, K)


def make_store(path, versions=(1,), chunk_rows=512):
    images = np.zeros((N, 2, 2), np.uint8)
    store = ExemplarStore.create(path, images, latent_dim=D, chunk_rows=chunk_rows)
    for v in versions:
        publish(store, v)
    return store


def publish(store, version):
    store.begin_version(version)
    store.write_rows(version, 0, latents_of(version))
    store.mark_complete(version)


def check_answer(ids, dists, version):
    """The answer is exactly version `version`'s kNN, and no other version's."""
    ref_ids, ref_d = expected(version)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dists, ref_d, rtol=1e-4, atol=1e-4)
    for other in range(1, 12):
        if other != version:
            assert not np.allclose(dists, expected(other)[1], rtol=1e-4, atol=1e-4)


# -- IndexHolder, no Ray ---------------------------------------------------------------------

def test_holder_loads_newest_complete_and_never_an_incomplete_one(tmp_path):
    store = make_store(tmp_path / "s.zarr", versions=(1, 2))
    store.begin_version(3)
    store.write_rows(3, 0, latents_of(3)[:512])  # incomplete: never loaded
    holder = IndexHolder(str(store.path), CFG)
    assert holder.wait_for_version(2, timeout=30) == 2
    ids, dists, version = holder.search(QUERIES, K)
    assert version == 2
    check_answer(ids, dists, 2)
    with pytest.raises(StoreError, match="version 3 .* is not complete"):
        holder.refresh(3)
    status = holder.status()
    assert status["n"] == N and status["version"] == 2 and status["queries_served"] == 16
    assert not status["building"] and status["build_seconds"] > 0
    holder.close()


@contextlib.contextmanager
def querying(search, threads: int):
    """Runs `search()` in a loop on `threads` threads for the duration of the block; yields
    the lists its answers and exceptions are collected in (surfaced by the caller)."""
    answers, errors, stop = [], [], threading.Event()

    def loop():
        while not stop.is_set():
            try:
                answers.append(search())
            except Exception as err:
                errors.append(err)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for t in workers:
        t.start()
    # the block starts once answers flow: on a busy CI box the first answer of a shard
    # hammer came back only after its block had moved both shards past version 1
    deadline = time.monotonic() + 60
    while not answers and not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield answers, errors
    finally:
        stop.set()
        for t in workers:
            t.join()


def test_holder_hammer_every_answer_from_exactly_one_version(tmp_path):
    store = make_store(tmp_path / "s.zarr", versions=(1,))
    holder = IndexHolder(str(store.path), CFG)
    holder.wait_for_version(1, timeout=30)
    with querying(lambda: holder.search(QUERIES, K), threads=3) as (answers, errors):
        for v in range(2, 8):
            publish(store, v)
            holder.refresh(v)
            time.sleep(0.02)
        holder.wait_for_version(7, timeout=30)
        time.sleep(0.05)
    holder.close()
    assert not errors, errors[:3]
    seen = sorted({v for _, _, v in answers})
    assert seen[-1] == 7 and len(seen) >= 2, seen
    for ids, dists, version in answers[::5]:
        check_answer(ids, dists, version)


def test_holder_calibrates_its_builds_for_the_depth_its_clients_search(tmp_path, monkeypatch):
    # the Ray driver passes RAT's k' (driver.recall_depth); kind=auto's nprobe is calibrated
    # for the recall of that many neighbours, not for a fixed 10
    from exvae_dist.retrieval import service

    depths = []

    class Recording(service.IndexBuilder):
        def build(self, latents):
            depths.append(self.recall_k)
            return super().build(latents)

    monkeypatch.setattr(service, "IndexBuilder", Recording)
    holder = IndexHolder(str(make_store(tmp_path / "s.zarr").path), CFG, recall_k=44)
    assert holder.wait_for_version(1, timeout=30) == 1
    holder.close()
    assert depths == [44]


def test_holder_search_before_any_version_raises_at_once(tmp_path):
    store = make_store(tmp_path / "s.zarr", versions=())
    holder = IndexHolder(str(store.path), CFG)
    start = time.monotonic()
    with pytest.raises(IndexNotReady, match="no complete latent version"):
        holder.search(QUERIES, K)
    assert time.monotonic() - start < 5  # an error, not a hang
    holder.close()


# -- the Ray actor ---------------------------------------------------------------------------

def test_service_serves_and_hammer_across_refreshes(ray_local, tmp_path):
    ray = ray_local
    store = make_store(tmp_path / "s.zarr", versions=(1,))
    handle = start_index_service(str(store.path), CFG)
    served(handle, 1, timeout=60)
    with querying(lambda: ray.get(handle.search.remote(QUERIES, K)), threads=2) as (answers,
                                                                                  errors):
        for v in range(2, 6):
            publish(store, v)
            assert ray.get(handle.refresh.remote(v)) == v
            time.sleep(0.05)
        served(handle, 5, timeout=60)
        time.sleep(0.1)
    assert not errors, errors[:3]
    assert {v for _, _, v in answers} >= {1, 5}
    for ids, dists, version in answers:
        check_answer(ids, dists, version)
    status = ray.get(handle.status.remote())
    assert status["queries_served"] >= 16 * len(answers) and status["version"] == 5
    ray.kill(handle)


def test_service_errors_reach_the_caller_readably(ray_local, tmp_path):
    ray = ray_local
    with pytest.raises(FileNotFoundError, match="no exemplar store at .*ExemplarStore.create"):
        start_index_service(str(tmp_path / "missing.zarr"), CFG)
    empty = make_store(tmp_path / "empty.zarr", versions=())
    handle = start_index_service(str(empty.path), CFG)
    with pytest.raises(IndexNotReady, match="no complete latent version"):
        ray.get(handle.search.remote(QUERIES, K), timeout=30)
    publish(empty, 1)
    ray.get(handle.refresh.remote(1))
    served(handle, 1, timeout=60)
    with pytest.raises(ValueError, match=r"queries must have shape \[B, 8\].*got \(16, 3\)"):
        ray.get(handle.search.remote(QUERIES[:, :3], K), timeout=30)
    with pytest.raises(StoreError, match="version 9 .* is not complete"):
        ray.get(handle.refresh.remote(9), timeout=30)
    ray.kill(handle)


def test_killed_service_restarts_with_newest_complete_version(ray_local, tmp_path):
    ray = ray_local
    store = make_store(tmp_path / "s.zarr", versions=(1,))
    handle = start_index_service(str(store.path), CFG)
    served(handle, 1, timeout=60)
    publish(store, 2)
    publish(store, 3)  # written, never announced to the service
    store.begin_version(4)  # incomplete: must not be picked up
    store.write_rows(4, 0, latents_of(4)[:512])
    assert ray.get(handle.search.remote(QUERIES, K))[2] == 1
    ray.kill(handle, no_restart=False)
    status = served(handle, 3, timeout=90)
    assert status["version"] == 3 and status["queries_served"] == 0  # a fresh holder
    ids, dists, version = ray.get(handle.search.remote(QUERIES, K), timeout=60)
    assert version == 3
    check_answer(ids, dists, 3)
    ray.kill(handle)


def test_faiss_threads_are_set_by_the_threads_that_run_faiss(tmp_path, monkeypatch):
    # OpenMP keeps its thread count per calling thread, and torch shares it in-process: the
    # holder must leave its constructor's count alone (it was the RAT step's torch threads in
    # bench_refresh), search with index.service_threads from whatever thread asks (Ray's
    # actor threads), and build with BUILD_THREADS in its own thread
    import faiss

    from exvae_dist.retrieval import service

    seen = {"search": [], "build": []}
    real_search, real_build = service.search, service.IndexBuilder.build
    monkeypatch.setattr(service, "search", lambda *a: seen["search"].append(
        faiss.omp_get_max_threads()) or real_search(*a))
    monkeypatch.setattr(service.IndexBuilder, "build", lambda self, x: seen["build"].append(
        faiss.omp_get_max_threads()) or real_build(self, x))
    faiss.omp_set_num_threads(1)
    holder = IndexHolder(str(make_store(tmp_path / "s.zarr").path),
                         dataclasses.replace(CFG, service_threads=3))
    assert faiss.omp_get_max_threads() == 1  # the constructing thread's count is untouched
    assert holder.wait_for_version(1, timeout=30) == 1
    asker = threading.Thread(target=lambda: holder.search(QUERIES, K))
    asker.start()
    asker.join()
    holder.close()
    assert seen == {"search": [3], "build": [service.BUILD_THREADS]}
