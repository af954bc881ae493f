"""The shared training step: neighbour search, prior sampling, precision options."""

import numpy as np
import pytest
import torch

from exvae_dist import config as config_mod
from exvae_dist.core.objective import build_model
from exvae_dist.core.exact import TorchExactSearch
from exvae_dist.core.step import PriorSampler, normalize_gradients


def test_torch_exact_search_equals_brute_force_knn():
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(3000, 8)).astype(np.float32)
    queries = rng.normal(size=(17, 8)).astype(np.float32)
    search = TorchExactSearch(block=700)  # several blocks, last one partial
    assert search.update(torch.from_numpy(latents)) == 0
    ids, version = search.search(queries, 25)
    d2 = ((queries[:, None, :].astype(np.float64) - latents[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ids, np.argsort(d2, axis=1, kind="stable")[:, :25])
    assert version == 0 and search.update(torch.from_numpy(latents)) == 1


def test_torch_exact_search_among_rows_equals_brute_force_over_those_rows():
    rng = np.random.default_rng(1)
    latents = rng.normal(size=(2000, 8)).astype(np.float32)
    queries = rng.normal(size=(9, 8)).astype(np.float32)
    rows = np.sort(rng.choice(2000, 700, replace=False))
    search = TorchExactSearch(block=300)
    search.update(torch.from_numpy(latents))
    ids, _ = search.search(queries, 12, among=rows)
    d2 = ((queries[:, None, :].astype(np.float64) - latents[rows][None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ids, rows[np.argsort(d2, axis=1, kind="stable")[:, :12]])


class FullSearch:
    """A search over all N answering "among S" as the index actors do (k' deep, S's members
    kept: candidates.nearest_members, what ShardedSearch.search runs)."""

    def __init__(self, inner):
        self.inner = inner

    def search(self, queries, k, among=None):
        from exvae_dist.core.candidates import nearest_members

        return nearest_members(self.inner.search, queries, k, among, safety=2.0)


def test_rat_sampler_keeps_the_k_nearest_of_the_steps_subset_less_the_element_itself():
    """Brute force: row b's components are the k nearest (float64 distance of the cached
    means) among the subset S of this step, less b's own exemplar; the same set as the k'-deep
    search over all N that the index services use."""
    from exvae_dist.core import keyed

    cfg, model, images = _model_and_data("prior.k=5", "prior.subsample=150")
    means = model.net.encode_top(images)[0].detach()
    search = TorchExactSearch()
    search.update(means)
    ids = np.array([3, 50, 51, 120, 200, 260, 333, 399])
    for step in (0, 7):
        subset = keyed.subset_for(step, 150, 400, 2)
        with torch.no_grad():
            q = model.net.encode_top(images[ids])[0].double().numpy()
        d2 = ((q[:, None, :] - means.double().numpy()[subset][None]) ** 2).sum(-1)
        expected = set()
        for b, row in enumerate(np.argsort(d2, axis=1, kind="stable")):
            expected |= set([int(i) for i in subset[row] if i != ids[b]][:5])
        prior = PriorSampler(cfg.prior, images, search, seed=2)(model, ids, images[ids], step)
        assert prior.n_short == 0 and set(prior.ids.tolist()) == expected
        full = PriorSampler(cfg.prior, images, FullSearch(search), seed=2)(
            model, ids, images[ids], step)
        assert full.n_short == 0 and np.array_equal(full.ids, prior.ids)
        assert torch.equal(full.exclude, prior.exclude)
        # normalizer log |S less {i}|: one fewer where the element itself is in S
        own = np.isin(ids, subset)
        assert own.any() and not own.all()  # both cases occur in this batch
        expected_norm = np.log(150 - own)
        for sampled in (prior, full):
            np.testing.assert_allclose(sampled.log_norm.double().numpy(), expected_norm)


def test_a_subset_lists_the_same_members_as_its_coins():
    from exvae_dist.core import keyed

    subset = keyed.StepSubset(5, 150, 400, 2)
    ids = np.arange(400)
    by_coins = subset.contains(ids)  # before S is listed: keyed coins
    assert np.array_equal(np.flatnonzero(by_coins), subset.ids)
    assert np.array_equal(subset.contains(ids), by_coins)  # after: binary search in S
    assert keyed.StepSubset(5, 400, 400, 2).contains(ids).all()


def test_first_members_keeps_the_first_k_accepted_ids_in_rank_order():
    from exvae_dist.core.candidates import first_members

    ranked = np.array([[5, -1, 2, 8, 4, 6], [1, 3, 5, 7, 9, -1]])
    got = first_members(ranked, lambda ids: ids % 2 == 0, 2)
    assert got.tolist() == [[2, 8], [-1, -1]]


def test_search_errors_are_clear():
    search = TorchExactSearch()
    with pytest.raises(RuntimeError, match="update"):
        search.search(np.zeros((2, 4), np.float32), 3)
    search.update(torch.zeros(10, 4))
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        search.search(np.zeros((2, 5), np.float32), 3)


def _model_and_data(*overrides):
    cfg = config_mod.load(None, ["train.batch_size=8", *overrides], env={})
    torch.manual_seed(0)
    model = build_model(cfg)
    images = torch.rand(400, 784)
    return cfg, model, images


@pytest.mark.parametrize("m", [150, 400])
def test_exact_subset_sampler_leaves_each_element_out(m):
    """Leave-one-out on the exact-subset path: column c of row b is masked exactly when the
    subset's exemplar c is batch element b's own image (brute force over the images)."""
    cfg, model, images = _model_and_data("prior.rat=false", f"prior.subsample={m}")
    sampler = PriorSampler(cfg.prior, images, seed=3)
    ids = np.arange(0, 400, 50)
    prior = sampler(model, ids, images[ids], step=7)
    assert prior.exemplars.shape == (m, 784) and prior.exclude.shape == (8, m)
    own = (prior.exemplars[None, :, :] == images[ids][:, None, :]).all(-1)  # [B, M]
    assert torch.equal(prior.exclude, own)
    if m == 400:  # every element is in the subset: each row masks exactly one column
        assert prior.exclude.sum(1).tolist() == [1] * 8
    # the coins are a function of (seed, step): the same step draws the same subset
    again = sampler(model, ids, images[ids], step=7)
    assert torch.equal(again.exemplars, prior.exemplars)
    if m < 400:
        assert not torch.equal(sampler(model, ids, images[ids], step=8).exemplars,
                               prior.exemplars)


def test_rat_sampler_never_offers_an_element_itself():
    cfg, model, images = _model_and_data("prior.k=5")
    search = TorchExactSearch()
    search.update(model.net.encode_top(images)[0].detach())
    sampler = PriorSampler(cfg.prior, images, search, seed=1)
    ids = np.arange(8)
    prior = sampler(model, ids, images[ids], step=0)
    chosen = np.nonzero(~prior.exclude.numpy())
    assert prior.n_short == 0 and prior.n_candidates <= 8 * 5
    # the union holds each element's own row only where another element retrieved it, masked
    for b in range(8):
        cand_rows = [i for i in range(prior.exemplars.shape[0])
                     if torch.equal(prior.exemplars[i], images[b])]
        assert all(prior.exclude[b, i] for i in cand_rows)
    assert len(chosen[0]) > 0


def test_normalized_gradients_have_unit_norm():
    p = torch.nn.Parameter(torch.randn(5, 3))
    p.grad = torch.randn(5, 3) * 40
    normalize_gradients([p])
    assert torch.linalg.norm(p.grad).item() == pytest.approx(1.0, rel=1e-5)


def test_validation_elbo_averages_its_samples():
    from exvae_dist.core.step import validation_elbo

    cfg = config_mod.load("smoke", ["prior.kind=gaussian"])
    torch.manual_seed(0)
    model = build_model(cfg, (1, 28, 28)).eval()
    x = (torch.rand(30, 784) < 0.3).float()
    torch.manual_seed(1)
    four = validation_elbo(model, x, None, batch_size=30, samples=4)
    torch.manual_seed(1)
    singles = [validation_elbo(model, x, None, batch_size=30) for _ in range(4)]
    for key in ("elbo", "log_px", "kl"):
        assert four[key] == pytest.approx(np.mean([s[key] for s in singles]), rel=1e-6)
    assert len({round(s["elbo"], 6) for s in singles}) > 1  # the draws really differ


@pytest.mark.parametrize("n,k,group", [(3000, 25, 64), (3001, 25, 64), (1000, 40, 7),
                                       (130, 3, 64), (50, 10, 64)])
def test_smallest_k_equals_a_full_sort(n, k, group):
    """The two-pass selection (group minima, then the chosen groups) returns exactly the k
    smallest of each row, sorted, whatever the partial last group; integer-valued scores give
    ties at the cut-off, where the values (not the columns) must agree."""
    from exvae_dist.core.exact import smallest_k

    g = torch.Generator().manual_seed(n)
    scores = torch.randn(9, n, generator=g)
    scores[0] = torch.arange(n, 0, -1).float()  # the smallest in the partial group
    s, cols = smallest_k(scores, k, group)
    ref_s, ref_cols = torch.sort(scores, dim=1, stable=True)
    assert torch.equal(s, ref_s[:, :k]) and torch.equal(cols, ref_cols[:, :k])
    ties = torch.randint(0, 20, (9, n), generator=g).float()
    s, cols = smallest_k(ties, k, group)
    assert torch.equal(s, torch.sort(ties, dim=1).values[:, :k])
    assert torch.equal(torch.gather(ties, 1, cols), s)
    assert all(len(set(r.tolist())) == k for r in cols)  # no column twice


def test_exact_topk_within_a_bound_equals_brute_force():
    """With `within` (an upper bound on each query's k-th distance, here the k-th distance
    of k random points: loose) the blocked search keeps only the points within it and still
    returns the exact k nearest (numpy brute force; integer latents give ties at the cut);
    a bound below the k-th distance is an error, not a short answer."""
    from exvae_dist.core.exact import exact_topk

    rng = np.random.default_rng(5)
    for points in (rng.normal(size=(5000, 12)).astype(np.float32),
                   rng.integers(0, 3, size=(5000, 12)).astype(np.float32)):
        queries = points[rng.choice(5000, 40, replace=False)] + 0.01
        want = ((queries[:, None] - points[None]) ** 2).sum(-1)  # [40, 5000]
        some = rng.choice(5000, (40, 11))  # 11 points per query, not the nearest
        loose = np.sort(np.take_along_axis(want, some, 1), 1)[:, -1]
        tight = np.sort(want, 1)[:, 10]  # the 11th distance itself: the matmul's rounding
        for bound in (loose, tight):
            d2, ids = exact_topk(torch.from_numpy(queries), torch.from_numpy(points), 11,
                                 block=700, within=torch.from_numpy(bound.astype(np.float32)))
            np.testing.assert_allclose(d2.numpy(), np.sort(want, 1)[:, :11], rtol=1e-5,
                                       atol=1e-5)
            np.testing.assert_allclose(np.take_along_axis(want, ids.numpy(), 1), d2.numpy(),
                                       rtol=1e-5, atol=1e-5)
            assert all(len(set(r)) == 11 for r in ids.tolist())
    with pytest.raises(ValueError, match="not an upper bound"):
        exact_topk(torch.from_numpy(queries), torch.from_numpy(points), 11,
                   within=torch.from_numpy(np.sort(want, 1)[:, 5].astype(np.float32)))
