"""Index functions against numpy brute force (no Ray, no Zarr)."""

import numpy as np
import pytest

from exvae_dist.config import IndexConfig
from exvae_dist.retrieval.index import (brute_force_knn, build_index, default_nlist,
                                        deserialize, describe, recall_at_k, resolve_kind,
                                        search, serialize)


def clustered(n, d=40, n_clusters=100, spread=1.0, seed=0):
    """[n, d] float32 Gaussian mixture: unit-variance centres, isotropic spread."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    labels = rng.integers(0, n_clusters, n)
    return centres[labels] + spread * rng.standard_normal((n, d)).astype(np.float32)


def numpy_knn(x, q, k):
    """Plain argsort over all pairwise squared distances (float64)."""
    d2 = ((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    ids = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(d2, ids, 1)


@pytest.mark.parametrize("shards", [1, 3])
def test_exact_index_equals_brute_force_knn(shards):
    x = clustered(3000, d=16, seed=1)
    q = clustered(50, d=16, seed=2)
    index = build_index(x, IndexConfig(kind="flat", shards=shards))
    ids, dists = search(index, q, 7)
    ref_ids, ref_d = numpy_knn(x, q, 7)
    assert ids.dtype == np.int64 and dists.dtype == np.float32 and ids.shape == (50, 7)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dists, ref_d, rtol=1e-4, atol=1e-3)


def test_brute_force_helper_matches_plain_argsort():
    x, q = clustered(500, d=8, seed=3), clustered(20, d=8, seed=4)
    ids, d2 = brute_force_knn(x, q, 5, block=7)
    ref_ids, ref_d = numpy_knn(x, q, 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(d2, ref_d, rtol=1e-9)


def test_ivfpq_with_reranking_reaches_recall_090_on_100k_clustered():
    x = clustered(100_000, d=40, seed=5)
    q = clustered(300, d=40, seed=6)
    truth, _ = brute_force_knn(x, q, 10)
    cfg = IndexConfig(kind="ivfpq", nlist=256, train_size=20_000)
    index = build_index(x, cfg)
    ids, dists = search(index, q, 10)
    recall = recall_at_k(ids, truth)
    assert recall >= 0.9, f"recall@10 {recall:.3f} ({describe(index)})"
    # re-ranked distances are exact distances of the returned ids
    exact = ((q[:, None, :].astype(np.float64) - x[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(dists, exact, rtol=1e-3, atol=1e-3)


def test_pq_without_reranking_is_worse_than_with_it():
    # pins why re-ranking is on by default (STACK_NOTES: PQ alone at d=40 is weak)
    x = clustered(20_000, d=40, seed=7)
    q = clustered(200, d=40, seed=8)
    truth, _ = brute_force_knn(x, q, 10)
    base = dict(kind="ivfpq", nlist=64, train_size=20_000)
    plain = recall_at_k(search(build_index(x, IndexConfig(refine_factor=0, **base)), q, 10)[0],
                        truth)
    refined = recall_at_k(search(build_index(x, IndexConfig(**base)), q, 10)[0], truth)
    assert refined > plain + 0.2, (plain, refined)


def test_sharded_ivfpq_returns_global_ids_and_roundtrips_through_bytes():
    x = clustered(12_000, d=40, seed=9)
    q = x[::400] + 0.01
    cfg = IndexConfig(kind="ivfpq", nlist=32, shards=3, train_size=12_000)
    index = build_index(x, cfg)
    ids, _ = search(index, q, 5)
    np.testing.assert_array_equal(ids[:, 0], np.arange(0, 12_000, 400))
    buf = serialize(index)
    assert buf.dtype == np.uint8
    again = deserialize(buf)
    np.testing.assert_array_equal(search(again, q, 5)[0], ids)
    flat = build_index(x, IndexConfig(kind="flat"))
    np.testing.assert_array_equal(search(deserialize(bytes(serialize(flat))), q, 5)[0],
                                  search(flat, q, 5)[0])


def test_auto_kind_picks_exact_below_threshold():
    cfg = IndexConfig(kind="auto", auto_exact_below=1000)
    assert resolve_kind(999, cfg) == "flat" and resolve_kind(1000, cfg) == "ivfpq"
    assert 1 <= default_nlist(10) and default_nlist(1_000_000) == 4000


def test_search_rejects_wrong_query_dimension_with_the_expected_shape():
    index = build_index(clustered(100, d=8), IndexConfig(kind="flat"))
    with pytest.raises(ValueError, match=r"dimension 5 .*\[B, 8\]"):
        search(index, np.zeros((3, 5), np.float32), 2)
    with pytest.raises(ValueError, match="k must be positive"):
        search(index, np.zeros((3, 8), np.float32), 0)


def test_bad_pq_m_names_valid_choices():
    with pytest.raises(ValueError, match="pq_m=7 does not divide the latent size 40"):
        build_index(clustered(5000, d=40), IndexConfig(kind="ivfpq", pq_m=7, nlist=16))


def test_asking_more_than_n_gives_minus_one_and_inf():
    index = build_index(clustered(4, d=3), IndexConfig(kind="flat"))
    ids, dists = search(index, np.zeros((1, 3), np.float32), 6)
    assert (ids[0, 4:] == -1).all() and np.isinf(dists[0, 4:]).all()
