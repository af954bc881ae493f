"""Nearest-neighbour indexes over a latent table: pure functions over FAISS and numpy.

    index = build_index(latents, cfg)          # latents: [N, d] float32
    ids, dists = search(index, queries, k)     # queries: [B, d] -> [B, k] int64, [B, k] float32
    buf = serialize(index); index = deserialize(buf)

Kinds (IndexConfig.kind):
- "flat":  exact L2 search (IndexFlatL2).
- "auto":  flat below IndexConfig.auto_exact_below exemplars; from there on an IVF whose
           query time does not grow with N (`auto_factory`): nlist = N / AUTO_LIST_SIZE
           (rounded), so every inverted list holds ~AUTO_LIST_SIZE vectors whatever N is,
           and an HNSW coarse quantizer (FAISS's `IVF<nlist>_HNSW32`) finds the nprobe
           nearest lists in ~log(nlist). The lists hold the raw vectors by default
           (`auto_codes="Flat"`), so every distance computed is exact and the top-k of the
           probed lists is exactly re-ranked by construction; `auto_codes="PQ10,RFlat"`
           scans PQ codes and re-ranks the best of them by exact distance (IndexRefineFlat,
           which keeps the raw vectors too; PQ codes alone, "PQ10", take a tenth of the
           memory but cap recall@10 near 0.4-0.5 at d=40). The coarse centroids
           come from faiss.contrib.clustering.two_level_clustering (k-means over sqrt(nlist)
           groups, then within each) on a sample of AUTO_TRAIN_PER_LIST points per
           list: a flat k-means over 1e5 centroids would not finish on a laptop. nprobe is
           then calibrated on the index's own rows to the smallest value reaching
           auto_target_recall (`calibrate_nprobe`): how far the true neighbours spread over
           the lists depends on the data, so no fixed nprobe holds recall at every N.

Sharding is not done here: each index-service shard (retrieval/service.py) builds one index
over its own contiguous rows, and the client merges the shards' top-k (merge_topk).

Distances are squared L2, as FAISS returns them.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Optional

import faiss
import numpy as np
import torch

from exvae_dist.config import IndexConfig
from exvae_dist.core.exact import exact_topk

log = logging.getLogger(__name__)

# HNSW efSearch while assigning rows to kind=auto's lists (see _nearest_lists)
ADD_EF_SEARCH = 16
# the smallest HNSW efSearch of a query's walk over kind=auto's centroids (FAISS's default)
MIN_EF_SEARCH = 16
# recall@k that kind=auto calibrates nprobe for unless its caller knows the depth it searches
# (the Ray driver passes RAT's k'); 10 is the depth recall is quoted at in bench/README.md
DEFAULT_RECALL_K = 10
# mean vectors per inverted list of kind=auto's IVF: a query scans nprobe lists of this
# length, so query time stays flat in N (bench/README.md, "Index service")
AUTO_LIST_SIZE = 64
# k-means sample per list: inside FAISS's 30..256 points per centroid, enough for stable
# centroids, and the build's k-means stays a fraction of adding the N vectors
AUTO_TRAIN_PER_LIST = 64
# index rows searched to measure recall at a build: the mean less two standard errors must
# reach the target, and 512 queries put that error near 0.5% at recall 0.95
CALIBRATION_QUERIES = 512
# nprobe when calibration is off (auto_target_recall=0): the fixed value used before
# calibration (recall@10 0.996 at N = 1e5, but 0.527 at 1e7: bench/README.md)
UNCALIBRATED_NPROBE = 64
# PQ codes over the lists (index.auto_codes=PQ...,RFlat): candidates re-ranked exactly per
# neighbour asked for; 10 reached recall@10 ~0.98 at N = 1e6 on clustered d=40 latents
REFINE_FACTOR = 10
# IndexBuilder gives up what it kept (lists, then centroids) once a query scans more than
# this many times the vectors it scanned right after the last k-means (calibrated nprobe x
# list imbalance)
RETRAIN_SCAN_GROWTH = 1.5


def resolve_kind(n: int, cfg: IndexConfig) -> str:
    """The concrete index kind ("flat" or "ivfhnsw", auto's IVF) for N exemplars."""
    if cfg.kind == "auto":
        return "flat" if n < cfg.auto_exact_below else "ivfhnsw"
    if cfg.kind != "flat":
        raise ValueError(f"index.kind={cfg.kind!r} is not one of auto, flat")
    return cfg.kind


def auto_nlist(n: int) -> int:
    """kind=auto's number of lists: N / AUTO_LIST_SIZE rounded, and at most N / 30 (FAISS
    warns below ~30 training points per centroid). Not rounded to a power of two: that made
    the mean list 49 vectors long at N = 1e5 and 76 at 1e7, and a query scans nprobe lists."""
    return int(max(1, min(round(n / AUTO_LIST_SIZE), n // 30)))


def auto_factory(n: int, cfg: IndexConfig) -> str:
    """kind=auto's FAISS factory string above auto_exact_below, e.g. "IVF15625_HNSW32,Flat"
    at N = 1e6."""
    return f"IVF{auto_nlist(n)}_HNSW32,{cfg.auto_codes}"


def build_index(latents: np.ndarray, cfg: IndexConfig, seed: int = 0,
                recall_k: int = DEFAULT_RECALL_K) -> faiss.Index:
    """An index over latents [N, d] (row n gets id n), ready to search; kind=auto's IVF is
    calibrated for the recall of the `recall_k` nearest. One version, from scratch:
    IndexBuilder.build keeps the lists and centroids across the versions of a training run.

    Search parameters (nprobe, re-ranking depth) are set here and travel with the index.
    An index over one shard's rows numbers them from 0; the shard adds its first row.
    On a machine where FAISS sees GPUs and cfg.use_gpu is set, flat indexes run on the GPU.
    """
    return IndexBuilder(cfg, seed, recall_k).build(latents)


class IndexBuilder:
    """Builds the successive versions of one training run's index.

    Between two refreshes the encoder moves the latents little, so most of what a kind=auto
    IVF build from scratch computes would come out nearly the same: the k-means of its coarse
    centroids, and which list each row falls in (at 1e7 the k-means took 869 s a version and
    assigning the rows through the HNSW quantizer most of the remaining 369 s:
    bench/README.md). A build therefore tries the cheapest of three ways first, calibrates
    what it built (`calibrate_nprobe`) and only goes on to the next when the calibrated
    recall says the cheaper one has gone stale:

    1. "lists":    every row goes into the list it went into last version, and each list's
                   centroid moves to the mean of its rows' new latents (the update step of
                   k-means without its assignment step); the HNSW graph over the centroids
                   is kept, with the moved centroids written into it. No row is searched
                   for: copying the rows into their lists is the whole build.
    2. "assign":   the rows are assigned afresh (the HNSW walk) to the centroids kept from
                   the last version.
    3. "kmeans":   new centroids (and, with PQ codes, codebooks) from a k-means.

    Stale means: the recall target is out of reach, or reaching it scans more than
    RETRAIN_SCAN_GROWTH times the vectors per query that the last k-means' index scanned:
    more lists probed, or lists grown uneven (the latents crowd into fewer of them),
    measured as the calibrated nprobe times FAISS's list imbalance factor (1 for lists of
    equal length). A way that keeps something needs a calibration to say so: with it off
    (index.auto_target_recall=0) every build runs the k-means, as build_index does.
    `last` describes the newest build (for logs and status).
    """

    def __init__(self, cfg: IndexConfig, seed: int = 0, recall_k: int = DEFAULT_RECALL_K):
        self.cfg, self.seed, self.recall_k = cfg, seed, recall_k
        self._trained: Optional[faiss.Index] = None  # empty IVF with the newest centroids
        self._lists: Optional[np.ndarray] = None  # int64 [N]: each row's list, last version
        self._trained_scan = 0.0  # scan_cost() of the last k-means' build
        self.last: dict = {}

    def build(self, latents: np.ndarray) -> faiss.Index:
        x = _as_matrix(latents, "latents")
        n, d = x.shape
        if n == 0:
            raise ValueError("cannot build an index over 0 latents")
        if resolve_kind(n, self.cfg) == "flat":
            index = _gpu_or_cpu(faiss.IndexFlatL2(d), self.cfg)
            index.add(x)
            self._trained = self._lists = None
            self.last = {"way": "flat"}  # no centroids: an exact index
            return index
        calibrated = self.cfg.auto_target_recall > 0
        template = self._trained
        if not calibrated or template is None or template.d != d \
                or faiss.extract_index_ivf(template).nlist != auto_nlist(n):
            template = None
        ways, kept = ["kmeans"], template
        if template is not None:
            ways = (["lists"] if self._lists is not None and len(self._lists) == n else []) \
                + ["assign", "kmeans"]
        start, truth = time.perf_counter(), {}  # the calibration's exact truth, for every way
        for way in ways:
            t0 = time.perf_counter()
            if way == "kmeans":
                template = _trained_ivfhnsw(x, self.cfg, self.seed)
            elif way == "lists":
                template = _with_list_means(kept, x, self._lists)
            else:  # the kept centroids, not the means of lists found stale
                template = kept
            index = faiss.clone_index(template)
            t1 = time.perf_counter()
            lists = self._lists if way == "lists" else _nearest_lists(index, x)
            _add_to_lists(index, x, lists)
            t2 = time.perf_counter()
            nprobe, recall, bound = calibrate_nprobe(index, x, self.cfg, self.seed,
                                                     self.recall_k, truth) \
                if calibrated else (faiss.extract_index_ivf(index).nprobe, math.nan, math.nan)
            scan = scan_cost(index)
            stale = bound < self.cfg.auto_target_recall \
                or scan > RETRAIN_SCAN_GROWTH * self._trained_scan
            if way == "kmeans" or not stale:
                break
            log.info("%s: recall@%d %.3f needs %.1f lists' worth scanned per query (after the "
                     "last k-means: %.1f): stale", _WAYS[way], self.recall_k, recall, scan,
                     self._trained_scan)
        if way == "kmeans":
            self._trained_scan = scan
        self._trained, self._lists = (template, lists) if calibrated else (None, None)
        self.last = {"way": way, "centroid_seconds": t1 - t0,
                     "add_seconds": t2 - t1, "calibration_seconds": time.perf_counter() - t2,
                     "nprobe": nprobe, "recall": recall, "scan": scan,
                     "seconds": time.perf_counter() - start}
        log.info("%s over %d rows: %s %.1f s, adding %.1f s, calibration %.1f s",
                 describe(index), n, _WAYS[way], t1 - t0, t2 - t1, time.perf_counter() - t2)
        return index


_WAYS = {"lists": "kept lists, centroids moved to their means",
         "assign": "kept centroids, rows assigned afresh", "kmeans": "k-means"}


def scan_cost(index: faiss.Index) -> float:
    """Vectors an IVF query scans, in mean list lengths: nprobe x the imbalance factor of
    the lists (sum of squared lengths x nlist / N^2), since a query from the data's own
    distribution lands in a list with probability proportional to its length."""
    ivf = faiss.extract_index_ivf(index)
    return ivf.nprobe * float(ivf.invlists.imbalance_factor())


def calibrate_nprobe(index: faiss.Index, latents: np.ndarray, cfg: IndexConfig,
                     seed: int = 0, recall_k: int = DEFAULT_RECALL_K,
                     truth: Optional[dict] = None) -> tuple[int, float, float]:
    """Sets kind=auto's nprobe to the smallest value whose recall@recall_k reaches
    cfg.auto_target_recall on this index's own data (its mean over the calibration queries
    less two standard errors), and returns (nprobe, mean recall, that lower bound). It doubles nprobe from 1
    until the target is reached, then bisects between the last value short of it and the
    first one past it (with exact codes recall can only grow with nprobe: more lists probed,
    the same distances), so the query time is not rounded up by as much as 2x.

    The calibration queries are CALIBRATION_QUERIES rows of `latents` (the vectors the
    index holds), drawn with `seed`; each is searched for its recall_k + 1 nearest
    latents and its own row is left out of both the answer and the exact truth
    (_exact_nearest, brute force), as RAT leaves a batch element's own exemplar out. Why measure
    instead of a fixed nprobe: how many lists the true neighbours spread over depends on
    the data (on 40-d isotropic clusters it grows ~N, on encoder latents far less;
    bench/README.md), so a fixed nprobe either wastes time or loses recall as N grows. The
    answer is a function of the data and the seed only (no timing), so rebuilding the same
    version gives the same index.
    """
    ivf = faiss.extract_index_ivf(index)
    x = _as_matrix(latents, "latents")
    n = x.shape[0]
    k = min(recall_k, n - 1)
    if k <= 0:
        return ivf.nprobe, 1.0, 1.0
    # the exact search below is most of a calibration (1e7: ~8 s); a caller that calibrates
    # several indexes over the same latents passes one dict and it runs once
    truth = {} if truth is None else truth
    if not truth:
        rows = np.sort(np.random.default_rng(seed).choice(
            n, min(n, CALIBRATION_QUERIES), replace=False))
        truth.update(rows=rows, nearest=_without_own_row(_exact_nearest(index, x, rows, k + 1),
                                                         rows, k))
    rows, queries = truth["rows"], x[truth["rows"]]

    def measure(nprobe: int) -> tuple[float, float]:
        set_nprobe(index, nprobe)
        _, found = index.search(queries, k + 1)
        per_query = recall_per_query(_without_own_row(found, rows, k), truth["nearest"])
        # the target must hold for queries not among these: the mean less two standard
        # errors (a ~97.5% lower confidence bound) has to reach it
        mean = float(per_query.mean())
        return mean, mean - 2 * float(per_query.std()) / math.sqrt(len(rows))

    short, nprobe = 0, 1  # the largest nprobe known short of the target; a candidate
    recall, bound = measure(nprobe)
    while bound < cfg.auto_target_recall and nprobe < ivf.nlist:
        short, nprobe = nprobe, min(2 * nprobe, ivf.nlist)
        recall, bound = measure(nprobe)
    if bound >= cfg.auto_target_recall:
        reached = (nprobe, recall, bound)
        while reached[0] - short > 1:
            middle = (short + reached[0]) // 2
            recall, bound = measure(middle)
            if bound >= cfg.auto_target_recall:
                reached = (middle, recall, bound)
            else:
                short = middle
        nprobe, recall, bound = reached
        set_nprobe(index, nprobe)
    log.info("calibrated nprobe %d of %d lists: recall@%d %.3f (lower bound %.3f) on %d of "
             "its own rows (target %.3f)", ivf.nprobe, ivf.nlist, k, recall, bound, len(rows),
             cfg.auto_target_recall)
    if bound < cfg.auto_target_recall:  # only with lossy codes: all lists are probed
        log.warning("index.auto_target_recall=%.3f is out of reach of %s even probing every "
                    "list (recall@%d %.3f): its codes lose it; use index.auto_codes=Flat",
                    cfg.auto_target_recall, describe(index), k, recall)
    return ivf.nprobe, recall, bound


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest latents of each query: ids [B, k] int64 and squared distances [B, k] float32.

    Slots beyond the index size hold id -1 and distance inf (FAISS's convention is a huge
    float; it is mapped to inf here so that callers can test it).
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    q = _as_matrix(queries, "queries")
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dimension {q.shape[1]} but the index holds "
                         f"{index.d}-dimensional latents: pass queries of shape [B, {index.d}]")
    dists, ids = index.search(q, k)
    dists = np.where(ids < 0, np.inf, dists).astype(np.float32, copy=False)
    return ids.astype(np.int64, copy=False), dists


def recall_per_query(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[B]: the fraction of each row's true k neighbours that appear in the found k."""
    return np.array([len(np.intersect1d(f, t)) / truth.shape[1] for f, t in zip(found, truth)])


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row's true k neighbours that appear in the found k ([B, k] each)."""
    return float(recall_per_query(found, truth).mean())


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Searches of kind=auto's IVF probe `nprobe` lists (at most all of them). The HNSW walk
    over the centroids must return at least that many; it keeps exactly that many candidates
    (efSearch = nprobe, FAISS's default 16 at least). A wider walk (it was max(64, 2 nprobe))
    finds the same lists a little more often, but on deformed-MNIST latents the narrow one
    answers in 0.64 / 0.78 / 0.77 of its time at N = 1e5 / 1e6 / 1e7 with the same held-out
    recall (bench/bench_hnsw_walk.py), and the calibration measures recall with this walk."""
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = min(nprobe, ivf.nlist)
    faiss.downcast_index(ivf.quantizer).hnsw.efSearch = max(MIN_EF_SEARCH, ivf.nprobe)


def serialize(index: faiss.Index) -> np.ndarray:
    """uint8 [bytes]: the index as a flat buffer, to pass between processes (Ray object store)."""
    return faiss.serialize_index(_to_cpu(index))


def deserialize(buf: np.ndarray | bytes, cfg: Optional[IndexConfig] = None) -> faiss.Index:
    """Inverse of serialize; with cfg.use_gpu and GPUs present, moves the index onto them."""
    arr = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, (bytes, bytearray)) else \
        np.ascontiguousarray(buf, dtype=np.uint8)
    index = faiss.deserialize_index(arr)
    return _gpu_or_cpu(index, cfg) if cfg is not None else index


def merge_topk(ids: list[np.ndarray], dists: list[np.ndarray], k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest over several shards' answers: lists of ids [B, k_s] and squared
    distances [B, k_s] (ids global, -1 / inf for empty slots) -> ids [B, k], dists [B, k].

    Ties between shards go to the smaller id.
    """
    all_ids = np.concatenate(ids, axis=1)
    all_d = np.concatenate(dists, axis=1)
    if all_ids.shape[1] < k:  # fewer slots than k overall: pad with empty ones
        pad = k - all_ids.shape[1]
        all_ids = np.pad(all_ids, ((0, 0), (0, pad)), constant_values=-1)
        all_d = np.pad(all_d, ((0, 0), (0, pad)), constant_values=np.inf)
    order = np.lexsort((np.where(all_ids < 0, np.iinfo(np.int64).max, all_ids), all_d),
                       axis=1)[:, :k]
    return (np.take_along_axis(all_ids, order, 1).astype(np.int64, copy=False),
            np.take_along_axis(all_d, order, 1).astype(np.float32, copy=False))


def describe(index: faiss.Index) -> str:
    """A short human-readable name of an index, for logs and status."""
    if isinstance(index, faiss.IndexRefine):
        return f"{describe(index.base_index)} + exact re-rank x{index.k_factor:g}"
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        pq = getattr(ivf, "pq", None)
        codes = f"PQ{pq.M}x{pq.nbits}" if pq is not None else type(ivf).__name__
        hnsw = "_HNSW" if isinstance(faiss.downcast_index(ivf.quantizer),
                                     faiss.IndexHNSW) else ""
        return f"IVF{ivf.nlist}{hnsw},{codes} (nprobe {ivf.nprobe})"
    return type(index).__name__


# -- internals -----------------------------------------------------------------------------

def _as_matrix(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, d], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contain NaN or inf")
    return a


def _trained_ivfhnsw(x: np.ndarray, cfg: IndexConfig, seed: int) -> faiss.Index:
    """kind=auto's empty IVF (auto_factory), trained on AUTO_TRAIN_PER_LIST points per list."""
    from faiss.contrib.clustering import two_level_clustering

    n, d = x.shape
    factory = auto_factory(n, cfg)
    try:
        index = faiss.index_factory(d, factory)
    except RuntimeError as err:
        raise ValueError(f"FAISS cannot build {factory!r} (index.auto_codes="
                         f"{cfg.auto_codes!r}): {err}; use e.g. Flat or PQ10,RFlat") from None
    ivf = faiss.extract_index_ivf(index)
    nlist = ivf.nlist
    n_train = min(n, AUTO_TRAIN_PER_LIST * nlist)
    rng = np.random.default_rng(seed)
    sample = x if n_train >= n else x[np.sort(rng.choice(n, n_train, replace=False))]
    if nlist > 1:
        centroids, _ = two_level_clustering(sample, max(1, int(math.sqrt(nlist))), nlist,
                                            clustering_niter=10, seed=seed)
    else:
        centroids = sample.mean(0, keepdims=True)
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index.train(sample)  # the coarse quantizer is full, so this trains codes (PQ) only
    set_nprobe(index, UNCALIBRATED_NPROBE)
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = float(REFINE_FACTOR)
    return index


def _nearest_lists(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """int64 [N]: the list each row of x goes into, by a shallow HNSW walk over the
    centroids: a row needs only its nearest list (1 of nlist), not the nprobe lists a query
    visits, and the walk with the query-time efSearch was most of a large build
    (bench/README.md). The query-time efSearch is put back afterwards."""
    ivf = faiss.extract_index_ivf(index)
    hnsw = faiss.downcast_index(ivf.quantizer).hnsw
    saved, hnsw.efSearch = hnsw.efSearch, ADD_EF_SEARCH
    try:
        _, lists = ivf.quantizer.search(x, 1)
    finally:
        hnsw.efSearch = saved
    if (lists < 0).any():  # add would skip such a row; a kept-lists build could not place it
        raise RuntimeError(f"the HNSW walk over {ivf.nlist} centroids found no list for "
                           f"{int((lists < 0).sum())} rows")
    return lists[:, 0].astype(np.int64)


def _add_to_lists(index: faiss.Index, x: np.ndarray, lists: np.ndarray) -> None:
    """index.add(x) with each row's list given (int64 [N]): row i gets id ntotal + i."""
    ivf = faiss.extract_index_ivf(index)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    ivf.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(lists))
    if isinstance(index, faiss.IndexRefine):  # PQ codes: the exact re-ranker holds the rows
        index.refine_index.add(x)
        index.ntotal = ivf.ntotal


def _centroids(index: faiss.Index) -> np.ndarray:
    """float32 [nlist, d], a writable view of the centroids inside the HNSW quantizer."""
    ivf = faiss.extract_index_ivf(index)
    storage = faiss.downcast_index(faiss.downcast_index(ivf.quantizer).storage)
    return faiss.rev_swig_ptr(storage.get_xb(), ivf.nlist * index.d).reshape(ivf.nlist,
                                                                             index.d)


def _with_list_means(template: faiss.Index, x: np.ndarray, lists: np.ndarray) -> faiss.Index:
    """A copy of the empty IVF `template` whose centroids are the means of the rows of x in
    each list (int64 [N]); an empty list keeps its centroid. The quantizer's HNSW graph,
    built over the old centroids, stays: they moved little, and the calibration measures
    the walk over the moved ones (rebuilding it took ~10 s at 156,250 lists)."""
    index = faiss.clone_index(template)
    centroids = _centroids(index)
    nlist, d = centroids.shape
    counts = np.bincount(lists, minlength=nlist)
    # one weighted bincount per dimension (float64 sums): np.add.at over [N, d] is ~10x slower
    sums = np.stack([np.bincount(lists, weights=x[:, j], minlength=nlist) for j in range(d)], 1)
    filled = counts > 0
    centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if isinstance(ivf, faiss.IndexIVFPQ) and ivf.by_residual:
        # PQ searches take part of each distance from a table of centroid x codebook terms
        # that train() filled: with the centroids moved, it must be filled again
        ivf.precompute_table()
    return index


def _exact_nearest(index: faiss.Index, x: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Ids [len(rows), k] of the k nearest rows of x to each x[rows], exactly: the index's
    own answer bounds each query's k-th distance (the k-th of the k rows it found; a query
    that found fewer, in short lists, is searched again probing twice as many), and
    core/exact.py's blocked search keeps only the rows within that bound, where faiss.knn's
    exact search heaps every row (several times slower at 1e7: bench/README.md)."""
    queries = x[rows]
    ivf = faiss.extract_index_ivf(index)
    nprobe = ivf.nprobe
    found = index.search(queries, k)[1]
    short = np.flatnonzero((found < 0).any(1))
    try:
        while len(short) and ivf.nprobe < ivf.nlist:
            set_nprobe(index, min(2 * ivf.nprobe, ivf.nlist))
            found[short] = index.search(queries[short], k)[1]
            short = short[(found[short] < 0).any(1)]
    finally:
        set_nprobe(index, nprobe)
    if len(short):  # fewer than k rows in all lists: not an index of x
        raise ValueError(f"the index holds fewer than {k} rows near query {rows[short[0]]}")
    d2 = ((x[found] - queries[:, None]) ** 2).sum(-1)
    return exact_topk(torch.from_numpy(queries), torch.from_numpy(x), k, block=4096,
                      within=torch.from_numpy(d2.max(1)))[1].numpy()


def _without_own_row(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """[B, k]: each row's ids with its own row id removed (or the last one, if absent)."""
    keep = ids != rows[:, None]
    keep[keep.sum(1) > k, -1] = False  # own row not found: drop the farthest instead
    return ids[keep].reshape(len(rows), k)


def _gpu_or_cpu(index: faiss.Index, cfg: Optional[IndexConfig]) -> faiss.Index:
    if cfg is not None and cfg.use_gpu and faiss.get_num_gpus() > 0 \
            and hasattr(faiss, "index_cpu_to_all_gpus"):
        return faiss.index_cpu_to_all_gpus(index)
    return index


def _to_cpu(index: faiss.Index) -> faiss.Index:
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index
