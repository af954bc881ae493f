"""The width of kind=auto's HNSW walk over the IVF centroids: efSearch = max(64, 2 nprobe)
(before 2026-12-03) against max(16, nprobe) (index.set_nprobe now), on the same indexes, in
one process, interleaved (one batch of each per round, best of 3, median over rounds).

    python bench/bench_hnsw_walk.py --latents bench/out/latents/deformed_10000128_<tag>.npy \
        --sizes 1e5,1e6,1e7

--latents: an [N + 128, d] float32 .npy (bench_index.py --data deformed makes one under
bench/out/latents); rows 0 .. N-1 are indexed, the last 128 rows are the queries (none of
them indexed). Each N is built once (kind=auto's IVF, nprobe calibrated with the walk as
set_nprobe sets it) and searched with both walks; recall@10 is against brute force.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_index import held_out_latents, qps  # noqa: E402  (this script's own folder is on sys.path)


def old_walk(index) -> None:
    """efSearch = max(64, 2 nprobe), as index.set_nprobe set it before 2026-12-03."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    faiss.downcast_index(ivf.quantizer).hnsw.efSearch = max(64, 2 * ivf.nprobe)


def new_walk(index) -> None:
    """The walk index.set_nprobe sets now (efSearch = max(16, nprobe))."""
    import faiss

    from exvae_dist.retrieval.index import set_nprobe

    set_nprobe(index, faiss.extract_index_ivf(index).nprobe)


WALKS = {"max(64, 2 nprobe)": old_walk, "max(16, nprobe)": new_walk}


def main() -> None:
    import faiss

    from exvae_dist.config import IndexConfig
    from exvae_dist.retrieval.index import build_index, recall_at_k, search

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latents", required=True, help="[N + 128, d] float32 .npy")
    parser.add_argument("--sizes", default="1e5,1e6")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    x, queries, sizes = held_out_latents(args.latents, args.sizes)
    built = {}
    for n in sizes:
        rows = np.ascontiguousarray(x[:n])
        truth = faiss.knn(queries, rows, 10)[1]
        start = time.perf_counter()
        index = build_index(rows, IndexConfig(kind="auto", auto_exact_below=0))
        print(f"N={n:.0e}: built in {time.perf_counter() - start:.0f} s", flush=True)
        built[n] = (faiss.serialize_index(index), truth)
        del rows, index
    indexes = {}
    for n, (blob, truth) in built.items():
        for walk, set_walk in WALKS.items():
            index = faiss.deserialize_index(blob)
            set_walk(index)
            indexes[(n, walk)] = (index, truth)
    times = {key: [] for key in indexes}
    for _ in range(args.rounds):
        for key, (index, _) in indexes.items():
            times[key].append(len(queries) / qps([(index, 0)], queries, repeats=3)[0])
    median = {key: float(np.median(t)) for key, t in times.items()}
    print(f"\n{args.threads} FAISS threads, 128 queries, k = 10, {args.rounds} rounds\n"
          "| N | nprobe | HNSW walk (efSearch) | queries/s | recall@10 | time / old walk |\n"
          "|---|---|---|---|---|---|")
    old = next(iter(WALKS))
    for (n, walk), (index, truth) in indexes.items():
        recall = recall_at_k(search(index, queries, 10)[0], truth)
        print(f"| {n:.0e} | {faiss.extract_index_ivf(index).nprobe} | {walk} | "
              f"{128 / median[(n, walk)]:,.0f} | {recall:.3f} | "
              f"{median[(n, walk)] / median[(n, old)]:.2f} |")
    for walk in WALKS:
        ratios = ", ".join(f"{n:.0e}: {median[(n, walk)] / median[(sizes[0], walk)]:.2f}"
                           for n in sizes[1:])
        print(f"query time / N={sizes[0]:.0e}, walk {walk}: {ratios}")


if __name__ == "__main__":
    main()
