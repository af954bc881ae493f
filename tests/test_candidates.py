"""candidates.py against plain python loops and brute-force distance sorts."""

import numpy as np
import pytest
from scipy import stats

from exvae_dist.core.candidates import assemble_candidates, draw_coins, query_depth, subset_size


def reference(neighbour_ids, batch_ids, coins, k):
    """Plain loop: per row, the first k ids in ranking order with coin True and != own id."""
    rows = []
    for row, own in zip(neighbour_ids, batch_ids):
        kept = []
        for n in row:
            if n >= 0 and coins[n] and n != own:
                kept.append(int(n))
            if len(kept) == k:
                break
        rows.append(kept)
    return rows


def random_case(rng, n=60, b=8, depth=25):
    # rows are random rankings over all N (no duplicates), some with -1 tails
    neighbour_ids = np.stack([rng.permutation(n)[:depth] for _ in range(b)]).astype(np.int64)
    neighbour_ids[0, depth - 5:] = -1
    batch_ids = rng.choice(n, b, replace=False).astype(np.int64)
    # put each element's own id somewhere in its ranking for most rows
    for i in range(b - 1):
        if batch_ids[i] not in neighbour_ids[i]:
            neighbour_ids[i, rng.integers(0, depth - 5)] = batch_ids[i]
    coins = rng.random(n) < 0.5
    return neighbour_ids, batch_ids, coins


@pytest.mark.parametrize("seed", range(20))
def test_matches_python_loop_reference(seed):
    rng = np.random.default_rng(seed)
    neighbour_ids, batch_ids, coins = random_case(rng)
    k = int(rng.integers(1, 8))
    cand = assemble_candidates(neighbour_ids, batch_ids, coins, k)
    ref = reference(neighbour_ids, batch_ids, coins, k)
    for b, kept in enumerate(ref):
        assert cand.per_row[b, :len(kept)].tolist() == kept
        assert (cand.per_row[b, len(kept):] == -1).all()
        assert batch_ids[b] not in cand.per_row[b]  # never its own id
    union = sorted({i for kept in ref for i in kept})
    assert cand.ids.tolist() == union and cand.ids.dtype == np.int64
    assert cand.n_short == sum(len(kept) < k for kept in ref)
    np.testing.assert_array_equal(cand.exclude, cand.ids[None, :] == batch_ids[:, None])
    expected_norm = [np.log(coins.sum() - int(coins[i])) for i in batch_ids]
    np.testing.assert_allclose(cand.log_norm, expected_norm)


def test_own_id_is_dropped_even_when_it_ranks_first_and_its_coin_is_up():
    neighbour_ids = np.array([[3, 1, 2], [1, 3, 0]])
    coins = np.ones(4, bool)
    cand = assemble_candidates(neighbour_ids, np.array([3, 1]), coins, k=2)
    assert cand.per_row.tolist() == [[1, 2], [3, 0]]
    assert cand.ids.tolist() == [0, 1, 2, 3]
    # row 0 (own id 3) must exclude centre 3 from its mixture, row 1 centre 1
    assert cand.exclude.tolist() == [[False, False, False, True], [False, True, False, False]]
    np.testing.assert_allclose(cand.log_norm, np.log([3, 3]))


def test_walking_the_ranking_equals_exact_top_k_of_the_coin_subset():
    rng = np.random.default_rng(0)
    n, d, b, k = 400, 5, 16, 6
    latents = rng.standard_normal((n, d))
    batch_ids = rng.choice(n, b, replace=False)
    queries = latents[batch_ids] + 0.05 * rng.standard_normal((b, d))
    d2 = ((queries[:, None, :] - latents[None]) ** 2).sum(-1)
    ranking = np.argsort(d2, axis=1, kind="stable")  # exact full ranking over all N
    for trial in range(10):
        coins = draw_coins(n, 150, np.random.default_rng(trial))
        cand = assemble_candidates(ranking, batch_ids, coins, k)
        for i in range(b):
            subset = np.flatnonzero(coins & (np.arange(n) != batch_ids[i]))
            top = subset[np.argsort(d2[i, subset], kind="stable")[:k]]
            assert cand.per_row[i].tolist() == top.tolist()
        assert cand.n_short == 0


def test_coin_selected_ranks_match_top_k_of_a_uniform_m_subset():
    """Over many minibatches, the rank positions chosen by walking the ranking with M/N coins
    have the distribution of the top-k ranks (own id left out) of a uniform random M-subset.

    The two differ only by O(1/M) (Binomial vs exact subset size: mean j-th rank j*N/M vs
    about j*N/(M+1)); with M=500 that is 0.2%. Tolerances: slot means within 4 standard
    errors of the difference plus that 1/M bias; histograms of selected ranks pass a
    chi-square homogeneity test at alpha 0.001; each near exemplar is picked with frequency
    M/N within 4 standard errors. Seeds are fixed.
    """
    n, m, k, draws = 2000, 500, 5, 20_000
    ranking = np.arange(1, 200)[None, :]  # one query, own id 0; 200 deep never runs short here
    rng = np.random.default_rng(123)
    coin_ranks = np.empty((draws, k), np.int64)
    for t in range(draws):
        cand = assemble_candidates(ranking, np.array([0]), draw_coins(n, m, rng), k)
        coin_ranks[t] = cand.per_row[0]  # id == rank position here
    rng2 = np.random.default_rng(456)
    uniform_ranks = np.empty((draws, k), np.int64)
    for t in range(draws):
        subset = np.sort(rng2.choice(n, m, replace=False))  # exactly M of all N ...
        uniform_ranks[t] = subset[subset != 0][:k]  # ... then leave-one-out, first k
    assert (coin_ranks > 0).all()
    se = np.sqrt((coin_ranks.var(0) + uniform_ranks.var(0)) / draws)
    bias = uniform_ranks.mean(0) / m
    assert (np.abs(coin_ranks.mean(0) - uniform_ranks.mean(0)) < 4 * se + bias).all(), (
        coin_ranks.mean(0), uniform_ranks.mean(0), se)
    # the j-th survivor's rank is a sum of j geometric gaps: mean j * N / M
    np.testing.assert_allclose(coin_ranks.mean(0), np.arange(1, k + 1) * n / m, rtol=0.02)
    bins = np.array([1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 25, 30, 40, 200])
    h1 = np.histogram(coin_ranks.ravel(), bins)[0]
    h2 = np.histogram(uniform_ranks.ravel(), bins)[0]
    _, p, _, _ = stats.chi2_contingency(np.stack([h1, h2]))
    assert p > 1e-3, (h1, h2, p)
    # each of the 3 nearest exemplars is in the subset, hence picked, with probability M/N
    freq = np.bincount(coin_ranks.ravel(), minlength=4)[1:4] / draws
    q = m / n
    assert (np.abs(freq - q) < 4 * np.sqrt(q * (1 - q) / draws)).all(), freq


def test_short_rows_are_counted_not_padded():
    neighbour_ids = np.array([[1, 2, 3, -1, -1], [0, 2, 3, 4, 5]])
    coins = np.array([True, True, False, True, True, True])
    cand = assemble_candidates(neighbour_ids, np.array([0, 1]), coins, k=3)
    assert cand.per_row.tolist() == [[1, 3, -1], [0, 3, 4]]
    assert cand.n_short == 1


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="must be \\[B, k'\\]"):
        assemble_candidates(np.zeros((3, 2), np.int64), np.zeros(2, np.int64), np.ones(5, bool), 1)
    with pytest.raises(ValueError, match="out of range"):
        assemble_candidates(np.array([[7]]), np.array([0]), np.ones(5, bool), 1)
    with pytest.raises(ValueError, match="batch ids must be exemplar rows in 0..4"):
        assemble_candidates(np.array([[1]]), np.array([5]), np.ones(5, bool), 1)
    with pytest.raises(ValueError, match="k must be positive"):
        assemble_candidates(np.array([[1]]), np.array([0]), np.ones(5, bool), 0)
    with pytest.raises(ValueError, match="M=0"):
        query_depth(10, 100, 0)


def test_query_depth_and_full_subset():
    assert query_depth(10, 50_000, 25_000, 2.0) == 40
    assert query_depth(10, 30, 1, 2.0) == 30  # capped at N
    assert draw_coins(5, 5, np.random.default_rng(0)).all()


def test_ray_runs_calibrate_the_index_for_the_depth_the_workers_search():
    from exvae_dist.config import ExperimentConfig
    from exvae_dist.train.driver import index_config

    cfg = ExperimentConfig()  # the paper's RAT: k = 10, M = N / 2, safety 2
    assert subset_size(50_000, None) == 25_000 and subset_size(50_000, 30_000) == 30_000
    assert index_config(cfg, 50_000).auto_recall_k == 40 == query_depth(10, 50_000, 25_000)
    cfg.prior.subsample = 50_000
    assert index_config(cfg, 50_000).auto_recall_k == 20
    cfg.index.auto_recall_k = 7  # set by the user: kept
    assert index_config(cfg, 50_000).auto_recall_k == 7
