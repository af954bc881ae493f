"""Index shards as Ray actors behind ShardedSearch: exact merge, IVF recall, one version per
answer across shards while they refresh, a shard that dies, and a build that fails."""

import time

import numpy as np
import pytest

from exvae_dist.config import IndexConfig
from brute_force import brute_force_knn
from exvae_dist.retrieval.index import recall_at_k
from exvae_dist.retrieval.service import start_index_shards
from exvae_dist.retrieval.store import ExemplarStore
from exvae_dist.train.service_client import ShardedSearch
from test_service import (CFG, K, QUERIES, check_answer, make_store, publish,
                          querying)


def kill_all(ray, handles):
    for h in handles:
        ray.kill(h)


def test_sharded_flat_search_equals_exhaustive_knn(ray_local, tmp_path):
    store = make_store(tmp_path / "s.zarr", versions=(1,))
    handles = start_index_shards(str(store.path), CFG, shards=3)
    client = ShardedSearch(handles, timeout_s=60)
    client.wait_served(1, timeout=60)
    ids, dists, version = client.search_with_distances(QUERIES, K)
    assert version == 1
    check_answer(ids, dists, 1)  # == brute_force_knn over all 2000 rows, global ids
    rows = [s["rows"] for s in client.status()["shards"]]
    assert rows == [[0, 666], [666, 1333], [1333, 2000]]
    kill_all(ray_local, handles)


def test_ivf_shards_reach_recall_095(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 40)).astype(np.float32)
    data = centres[rng.integers(0, 50, 20_128)] + rng.standard_normal((20_128, 40),
                                                                       dtype=np.float32)
    x, q = data[:20_000], data[20_000:]
    store = ExemplarStore.create(tmp_path / "s.zarr", np.zeros((20_000, 1), np.uint8), 40,
                                 chunk_rows=5000)
    store.begin_version(1)
    store.write_rows(1, 0, x)
    store.mark_complete(1)
    cfg = IndexConfig(kind="auto", auto_exact_below=1000, service_threads=1)
    handles = start_index_shards(str(store.path), cfg, shards=2)
    client = ShardedSearch(handles, timeout_s=60)
    status = client.wait_served(1, timeout=120)
    assert all(s["kind"].startswith("IVF156_HNSW,") for s in status["shards"]), status
    ids, _ = client.search(q, 10)
    recall = recall_at_k(ids, brute_force_knn(x, q, 10)[0])
    assert recall >= 0.95, recall
    kill_all(ray_local, handles)


def test_hammer_every_answer_is_one_version_on_all_shards(ray_local, tmp_path):
    ray = ray_local
    store = make_store(tmp_path / "s.zarr", versions=(1,))
    handles = start_index_shards(str(store.path), CFG, shards=2)
    ShardedSearch(handles).wait_served(1, timeout=60)
    clients = [ShardedSearch(handles, timeout_s=60) for _ in range(2)]
    calls = iter(range(10**9))

    def one_search():
        return clients[next(calls) % 2].search_with_distances(QUERIES, K)

    with querying(one_search, threads=2) as (answers, errors):
        for v in range(2, 6):
            publish(store, v)
            # the refresh reaches the shards 0.3 s apart: shard 0 holds v alone meanwhile
            ray.get(handles[0].refresh.remote(v))
            time.sleep(0.3)
            ray.get(handles[1].refresh.remote(v))
            time.sleep(0.2)
        ShardedSearch(handles).wait_served(5, timeout=60)
        time.sleep(0.2)
    assert not errors, errors[:3]
    assert {v for _, _, v in answers} >= {1, 5}
    for ids, dists, version in answers:
        check_answer(ids, dists, version)  # a mixed answer matches no single version
    statuses = [ray.get(h.status.remote()) for h in handles]
    assert all(s["ready"] == [5] and s["committed"] == 5 for s in statuses), statuses
    kill_all(ray, handles)


def test_a_killed_shard_makes_queries_wait_then_answer_and_a_dead_one_times_out(ray_local,
                                                                             tmp_path):
    ray = ray_local
    store = make_store(tmp_path / "s.zarr", versions=(1,))
    handles = start_index_shards(str(store.path), CFG, shards=2)
    client = ShardedSearch(handles, timeout_s=60)
    client.wait_served(1, timeout=60)
    assert client.search(QUERIES, K)[1] == 1
    publish(store, 2)  # complete, never announced: the restarted shard loads it
    with querying(lambda: client.search_with_distances(QUERIES, K), threads=1) as (answers,
                                                                                  errors):
        time.sleep(0.2)
        ray.kill(handles[1], no_restart=False)  # a crash: Ray restarts it
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(v == 2 for _, _, v in answers[-3:]):
            time.sleep(0.1)
    assert not errors, errors[:3]
    # the restarted shard holds only v2, so the client asked shard 0 for it and moved on
    assert answers[-1][2] == 2
    for ids, dists, version in answers:
        check_answer(ids, dists, version)
    assert ray.get(handles[1].status.remote())["queries_served"] < len(answers) * 16

    ray.kill(handles[1], no_restart=True)  # gone for good: a bounded, named error
    short = ShardedSearch(handles, timeout_s=2)
    short.version = 2
    with pytest.raises(TimeoutError, match=r"shard 1 unavailable.*index.query_timeout_s"):
        short.search(QUERIES, K)
    kill_all(ray, handles)


def test_wait_served_fails_at_once_when_a_shard_build_fails(ray_local, tmp_path):
    store = make_store(tmp_path / "s.zarr", versions=(1,))
    bad = IndexConfig(kind="auto", auto_exact_below=0, auto_codes="Bogus", service_threads=1)
    handles = start_index_shards(str(store.path), bad, shards=2)
    # an error naming the build's problem, long before the timeout (a TimeoutError otherwise)
    with pytest.raises(RuntimeError, match=r"failed to build version 1: .*auto_codes='Bogus'"):
        ShardedSearch(handles).wait_served(1, timeout=600)
    kill_all(ray_local, handles)
