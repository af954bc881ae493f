"""Index functions against numpy brute force (no Ray, no Zarr)."""

import dataclasses

import faiss
import numpy as np
import pytest
from brute_force import brute_force_knn

from exvae_dist.config import IndexConfig
from exvae_dist.retrieval.index import (CALIBRATION_QUERIES, UNCALIBRATED_NPROBE, IndexBuilder,
                                        auto_factory, auto_nlist, build_index,
                                        calibrate_nprobe, deserialize, describe, merge_topk,
                                        recall_at_k, resolve_kind, search, serialize,
                                        set_nprobe)


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


def test_exact_index_equals_brute_force_knn():
    x = clustered(3000, d=16, seed=1)
    q = clustered(50, d=16, seed=2)
    index = build_index(x, IndexConfig(kind="flat"))
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


def test_auto_ivf_with_pq_codes_reranked_reaches_recall_090():
    # the design's IVF-PQ at large N: kind=auto with PQ codes (index.auto_codes), whose
    # candidates are re-ranked by exact distance (PQ alone at d=40 is weak)
    data = clustered(12_300, d=40, seed=5)
    x, q = data[:12_000], data[12_000:]
    truth, _ = brute_force_knn(x, q, 10)
    cfg = IndexConfig(kind="auto", auto_exact_below=0, auto_codes="PQ10,RFlat",
                      auto_target_recall=0.9)
    index = build_index(x, cfg)
    assert "PQ10x8" in describe(index) and "exact re-rank x10" in describe(index)
    ids, dists = search(index, q, 10)
    recall = recall_at_k(ids, truth)
    assert recall >= 0.9, f"recall@10 {recall:.3f} ({describe(index)})"
    # re-ranked distances are exact distances of the returned ids
    exact = ((q[:, None, :].astype(np.float64) - x[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(dists, exact, rtol=1e-3, atol=1e-3)
    # pins why the re-ranking goes REFINE_FACTOR deep: re-ranking only the k best PQ
    # candidates (the PQ order) loses much of the recall
    index.k_factor = 1.0
    plain = recall_at_k(search(index, q, 10)[0], truth)
    assert recall > plain + 0.15, (plain, recall)


def test_pq_codes_kept_lists_encode_and_search_against_the_moved_centroids():
    # PQ codes are residuals from their list's centroid, and PQ searches take part of each
    # distance from a table of centroid terms: latents shifted as a whole keep every row's
    # list but move every centroid, so a version built on kept lists must encode AND search
    # against the moved centroids. Its PQ distances (before the exact re-rank) must be as
    # good as those of a k-means build of the same latents.
    first = clustered(12_300, d=40, seed=5)
    moved = first + 1.0
    x, q = moved[:12_000], moved[12_000:]
    truth, _ = brute_force_knn(x, q, 10)
    cfg = IndexConfig(kind="auto", auto_exact_below=0, auto_codes="PQ10,RFlat",
                      auto_target_recall=0.9)
    builder = IndexBuilder(cfg)
    builder.build(first[:12_000])
    index = builder.build(x)
    assert builder.last["way"] == "lists" and index.ntotal == 12_000
    ids, dists = search(index, q, 10)
    assert recall_at_k(ids, truth) >= 0.9
    exact = ((q[:, None, :].astype(np.float64) - x[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(dists, exact, rtol=1e-3, atol=1e-3)

    def pq_error(index):
        ivf = faiss.extract_index_ivf(index)
        set_nprobe(index, ivf.nlist)
        d, i = ivf.search(q, 10)
        return np.abs(d - ((q[:, None, :].astype(np.float64) - x[i]) ** 2).sum(-1)).mean()

    fresh = build_index(x, cfg)
    assert pq_error(index) <= 1.5 * pq_error(fresh)


def test_merged_shard_answers_equal_brute_force_over_all_rows():
    x, q = clustered(3000, d=16, seed=1), clustered(50, d=16, seed=2)
    bounds = [0, 1000, 1001, 3000]  # uneven, one shard of one row (fewer slots than k)
    parts = [search(build_index(x[lo:hi], IndexConfig(kind="flat")), q, 7)
             for lo, hi in zip(bounds[:-1], bounds[1:])]
    ids, dists = merge_topk([i + lo for (i, _), lo in zip(parts, bounds)],
                            [d for _, d in parts], 7)
    ref_ids, ref_d = numpy_knn(x, q, 7)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dists, ref_d, rtol=1e-4, atol=1e-3)
    # empty slots (-1, inf) sort last
    few, _ = merge_topk([np.array([[3, -1]])], [np.array([[1.0, np.inf]])], 3)
    assert few.tolist() == [[3, -1, -1]]


def test_auto_ivf_hnsw_reaches_recall_095_and_roundtrips_through_bytes():
    data = clustered(30_200, d=40, seed=5)  # queries from the same mixture as the latents
    x, q = data[:30_000], data[30_000:]
    truth, _ = brute_force_knn(x, q, 10)
    cfg = IndexConfig(kind="auto", auto_exact_below=10_000)
    assert resolve_kind(len(x), cfg) == "ivfhnsw" and auto_nlist(len(x)) == 469
    index = build_index(x, cfg)
    assert describe(index).startswith("IVF469_HNSW,")
    ids, dists = search(index, q, 10)
    recall = recall_at_k(ids, truth)
    assert recall >= 0.95, f"recall@10 {recall:.3f} ({describe(index)})"
    # the lists hold raw vectors: returned distances are the exact ones
    exact = ((q[:, None, :].astype(np.float64) - x[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(dists, exact, rtol=1e-3, atol=1e-3)
    again = deserialize(serialize(index))
    np.testing.assert_array_equal(search(again, q, 10)[0], ids)


def _recall_bound_without_self(index, x, rows, k, truth):
    """Mean recall@k and its lower confidence bound (mean less two standard errors)
    of index on rows of x as queries, each query's own row left out, against `truth`, the
    exhaustive numpy kNN (k + 1 deep) of those rows: the calibration's criterion, computed
    independently."""
    found, _ = search(index, x[rows], k + 1)
    per_query = []
    for r, f, t in zip(rows, found, truth):
        f = [i for i in f if i != r][:k]
        t = [i for i in t if i != r][:k]
        per_query.append(len(set(f) & set(t)) / k)
    per_query = np.array(per_query)
    return per_query.mean(), per_query.mean() - 2 * per_query.std() / np.sqrt(len(rows))


def test_calibrated_nprobe_is_the_smallest_whose_bound_reaches_the_target():
    x = clustered(12_000, d=16, seed=11)
    cfg = IndexConfig(kind="auto", auto_exact_below=0)
    # the same index uncalibrated, and the same rows the calibration draws (seed 3):
    # mean recall and its lower bound at every nprobe, against brute force
    index = build_index(x, dataclasses.replace(cfg, auto_target_recall=0), seed=3)
    assert faiss.extract_index_ivf(index).nprobe == UNCALIBRATED_NPROBE  # calibration off
    rows = np.sort(np.random.default_rng(3).choice(len(x), CALIBRATION_QUERIES, replace=False))
    truth, _ = numpy_knn(x, x[rows], 6)
    table = {}
    for p in range(1, 65):
        set_nprobe(index, p)  # nprobe and the HNSW walk, as the calibration sets them
        table[p] = _recall_bound_without_self(index, x, rows, 5, truth)
    # a target between the bound and the mean of a middle nprobe: a calibration on the
    # mean alone would stop there, one on the bound must go further
    middle = next(p for p, (mean, bound) in table.items() if 0.6 < mean < 0.99)
    target = sum(table[middle]) / 2
    expected = min(p for p, (_, bound) in table.items() if bound >= target)
    assert expected > middle
    assert expected & (expected - 1), "not a power of two: the old doubling could not find it"
    calibrated = build_index(x, dataclasses.replace(cfg, auto_target_recall=target), seed=3,
                             recall_k=5)
    assert faiss.extract_index_ivf(calibrated).nprobe == expected
    # deterministic: the same data and seed give the same index settings
    again = build_index(x, dataclasses.replace(cfg, auto_target_recall=target), seed=3,
                        recall_k=5)
    assert faiss.extract_index_ivf(again).nprobe == expected
    # the recall it reports is the recall@5 of those rows (the depth asked), not @10's
    nprobe, recall, bound = calibrate_nprobe(
        index, x, dataclasses.replace(cfg, auto_target_recall=target), seed=3, recall_k=5)
    assert nprobe == expected and recall == pytest.approx(table[expected][0], abs=1e-9)
    assert bound == pytest.approx(table[expected][1], abs=1e-9)


def test_build_index_calibrates_for_the_depth_its_caller_searches(monkeypatch):
    # the Ray driver asks for RAT's k' (driver.recall_depth), deeper than the default 10
    from exvae_dist.retrieval import index as index_mod

    depths = []
    monkeypatch.setattr(index_mod, "calibrate_nprobe", lambda *args, **kw: depths.append(
        args[4] if len(args) > 4 else kw["recall_k"]) or (1, 1.0, 1.0))
    build_index(clustered(3000, d=8), IndexConfig(kind="auto", auto_exact_below=0), recall_k=44)
    build_index(clustered(3000, d=8), IndexConfig(kind="auto", auto_exact_below=0))
    assert depths == [44, 10]


def test_calibration_reaches_the_target_on_held_out_queries():
    data = clustered(40_300, d=40, seed=12)
    x, q = data[:40_000], data[40_000:]
    cfg = IndexConfig(kind="auto", auto_exact_below=0, auto_target_recall=0.95)
    index = build_index(x, cfg)
    truth, _ = brute_force_knn(x, q, 10)
    recall = recall_at_k(search(index, q, 10)[0], truth)
    assert recall >= 0.93, f"recall@10 {recall:.3f} on held-out queries ({describe(index)})"


def test_auto_kind_picks_exact_below_threshold_and_lists_of_constant_length():
    cfg = IndexConfig(kind="auto", auto_exact_below=1000)
    assert resolve_kind(999, cfg) == "flat" and resolve_kind(1000, cfg) == "ivfhnsw"
    # nlist grows with N (N / 64 rounded): the mean list length stays 64
    for n in (10**5, 10**6, 10**7, 3 * 10**7 + 7):
        assert 63.5 <= n / auto_nlist(n) <= 64.5
    assert auto_factory(10**7, cfg) == "IVF156250_HNSW32,Flat"
    assert auto_nlist(100) == 2  # at most N / 30 lists
    with pytest.raises(ValueError, match="auto_codes='Bogus'"):
        build_index(clustered(2000, d=8), IndexConfig(auto_exact_below=0, auto_codes="Bogus"))


def test_search_rejects_wrong_query_dimension_with_the_expected_shape():
    index = build_index(clustered(100, d=8), IndexConfig(kind="flat"))
    with pytest.raises(ValueError, match=r"dimension 5 .*\[B, 8\]"):
        search(index, np.zeros((3, 5), np.float32), 2)
    with pytest.raises(ValueError, match="k must be positive"):
        search(index, np.zeros((3, 8), np.float32), 0)


def test_asking_more_than_n_gives_minus_one_and_inf():
    index = build_index(clustered(4, d=3), IndexConfig(kind="flat"))
    ids, dists = search(index, np.zeros((1, 3), np.float32), 6)
    assert (ids[0, 4:] == -1).all() and np.isinf(dists[0, 4:]).all()


def test_faiss_loader_chain_is_not_logged(tmp_path):
    """FAISS's loader logged "Could not load library with AVX512 support"
    with a ModuleNotFoundError chain at INFO, read as errors."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import logging; logging.basicConfig(level=logging.INFO); "
            "import exvae_dist.retrieval.service")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                              "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "faiss.loader" not in out.stderr and "ModuleNotFoundError" not in out.stderr


def test_index_builder_keeps_lists_then_centroids_and_trains_again_once_stale(monkeypatch):
    """IndexBuilder, brute force as the truth: a version whose latents moved a little keeps
    every row's list (no row searched for, no k-means), its centroids move to their lists'
    means, and it still reaches the recall target on held-out queries; the same latents in
    another row order make the kept lists wrong for nearly every row, the calibration says
    so, and the rows are assigned afresh to the kept centroids (still no k-means); latents
    that moved far (another place and scale) train the centroids again."""
    from exvae_dist.retrieval import index as index_mod

    kmeans, assigned = [], []
    train, nearest = index_mod._trained_ivfhnsw, index_mod._nearest_lists
    monkeypatch.setattr(index_mod, "_trained_ivfhnsw",
                        lambda *a, **kw: kmeans.append(1) or train(*a, **kw))
    monkeypatch.setattr(index_mod, "_nearest_lists",
                        lambda *a, **kw: assigned.append(1) or nearest(*a, **kw))
    cfg = IndexConfig(kind="auto", auto_exact_below=0, auto_target_recall=0.95)
    builder = IndexBuilder(cfg, seed=1)
    rng = np.random.default_rng(7)

    def held_out_recall(index, data):
        x, q = data[:20_000], data[20_000:]
        truth, _ = numpy_knn(x, q, 10)
        return recall_at_k(search(index, q, 10)[0], truth)

    first = clustered(20_200, d=16, seed=21)
    index = builder.build(first[:20_000])
    assert builder.last["way"] == "kmeans" and len(kmeans) == 1 and len(assigned) == 1
    assert held_out_recall(index, first) >= 0.93
    lists = builder._lists.copy()

    moved = first + 0.05 * rng.standard_normal(first.shape).astype(np.float32)
    index = builder.build(moved[:20_000])
    assert builder.last["way"] == "lists" and len(kmeans) == 1 and len(assigned) == 1
    assert index.ntotal == 20_000 and builder.last["recall"] >= 0.95
    assert held_out_recall(index, moved) >= 0.93
    np.testing.assert_array_equal(builder._lists, lists)
    # every row sits in its old list, and each centroid is the numpy mean of its rows
    ivf = faiss.extract_index_ivf(index)
    for list_no in range(ivf.nlist):
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(list_no), ivf.invlists.list_size(list_no))
        np.testing.assert_array_equal(np.sort(ids), np.flatnonzero(lists == list_no))
    centroids = index_mod._centroids(builder._trained)
    for list_no in np.unique(lists)[:50]:
        np.testing.assert_allclose(centroids[list_no],
                                   moved[:20_000][lists == list_no].astype(np.float64).mean(0),
                                   rtol=1e-5, atol=1e-5)
    # the kept template is still empty: versions never share vectors
    assert builder._trained.ntotal == 0
    # and the next build moves copies: the centroids this version serves stay where they are
    served, kept = (index_mod._centroids(index).copy(),
                    index_mod._centroids(builder._trained).copy())
    served_index = index

    shuffled = moved[np.concatenate([rng.permutation(20_000), np.arange(20_000, 20_200)])]
    exact = []  # the calibration's exact search: once per build, whatever ways it tries
    exact_nearest = index_mod._exact_nearest
    monkeypatch.setattr(index_mod, "_exact_nearest",
                        lambda *a, **kw: exact.append(1) or exact_nearest(*a, **kw))
    index = builder.build(shuffled[:20_000])
    assert len(exact) == 1
    assert builder.last["way"] == "assign" and len(kmeans) == 1 and len(assigned) == 2
    np.testing.assert_array_equal(index_mod._centroids(served_index), served)
    np.testing.assert_array_equal(index_mod._centroids(builder._trained), kept)
    assert builder.last["recall"] >= 0.95 and held_out_recall(index, shuffled) >= 0.93

    elsewhere = 4.0 * clustered(20_200, d=16, seed=22) + 10.0
    index = builder.build(elsewhere[:20_000])
    assert builder.last["way"] == "kmeans" and len(kmeans) == 2
    assert held_out_recall(index, elsewhere) >= 0.93


def test_calibration_truth_is_brute_force_whatever_the_index_found():
    """The calibration's exact nearest rows (bounded by the index's own answer) equal numpy
    brute force, with an index that finds little (one list probed) and one that finds all."""
    from exvae_dist.retrieval import index as index_mod

    x = clustered(6000, d=16, seed=31)
    rows = np.sort(np.random.default_rng(0).choice(6000, 64, replace=False))
    want = np.argsort(((x[rows, None] - x[None]) ** 2).sum(-1), 1, kind="stable")[:, :11]
    index = index_mod.build_index(x, dataclasses.replace(IndexConfig(), auto_exact_below=0,
                                                         auto_target_recall=0))
    # lists of ~6 rows: at nprobe 1 no query finds 11, and is searched again, wider
    small_lists = faiss.index_factory(16, "IVF1000_HNSW32,Flat")
    small_lists.train(x)
    small_lists.add(x)
    for index, nprobe in ((index, 1), (index, faiss.extract_index_ivf(index).nlist),
                          (small_lists, 1)):
        index_mod.set_nprobe(index, nprobe)
        got = index_mod._exact_nearest(index, x, rows, 11)
        # as sets: equal distances may come in either order
        assert [set(g) for g in got] == [set(w) for w in want]
        assert faiss.extract_index_ivf(index).nprobe == nprobe  # left as it was
