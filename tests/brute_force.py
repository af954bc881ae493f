"""Reference exact kNN for the tests: plain numpy, float64, no FAISS or torch."""

import numpy as np


def brute_force_knn(latents: np.ndarray, queries: np.ndarray, k: int,
                    block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Reference exact kNN in numpy (float64 distances, blocks of queries): ids [B, k], d2 [B, k].

    Ties are broken by the smaller id. The reference the index and the sharded search are
    checked against (it lived in retrieval/index.py while nothing but the tests used it).
    """
    x = np.asarray(latents, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    k = min(k, x.shape[0])
    x2 = (x * x).sum(1)
    out_ids = np.empty((q.shape[0], k), dtype=np.int64)
    out_d = np.empty((q.shape[0], k), dtype=np.float64)
    for lo in range(0, q.shape[0], block):
        qb = q[lo:lo + block]
        d2 = (qb * qb).sum(1)[:, None] - 2 * qb @ x.T + x2[None, :]
        part = np.argpartition(d2, k - 1, axis=1)[:, :k] if k < x.shape[0] else \
            np.tile(np.arange(x.shape[0]), (qb.shape[0], 1))
        pd = np.take_along_axis(d2, part, 1)
        order = np.lexsort((part, pd), axis=1)
        out_ids[lo:lo + block] = np.take_along_axis(part, order, 1)
        out_d[lo:lo + block] = np.take_along_axis(pd, order, 1)
    return out_ids, np.maximum(out_d, 0.0)
