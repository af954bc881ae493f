"""Where kind=auto's IVF query time goes as N grows: the HNSW walk over the centroids (the
coarse step) against the whole search, per N, in one process, interleaved (one batch of each
per round, best of 3, median over rounds). "whole - coarse" is the time of the probed lists'
scan: the query time a free coarse step would leave, so its ratio across N is the floor of
the issue's "1e7 / 1e5 query time" for any coarse quantizer.

    python bench/bench_ivf_parts.py --latents bench/out/latents/deformed_10000128_<tag>.npy \
        --sizes 1e5,1e7 --index-dir /tmp/ivf_parts
    # the same with the indexes' memory on transparent huge pages (THP in madvise mode):
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/bench_ivf_parts.py ...

--latents: an [N + 128, d] float32 .npy (bench_index.py --data deformed makes one under
bench/out/latents); rows 0 .. N-1 are indexed, the last 128 rows are the queries (none of
them indexed). --index-dir keeps each built index (ivf_<N>.faiss, a 1e7 build takes ~6 min
on 2 cores) and reuses it on the next run with the same latents (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_index import held_out_latents  # noqa: E402  (this script's own folder is on sys.path)


def anon_huge_pages_kb() -> int:
    """This process's anonymous memory on transparent huge pages (Linux), in kB."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages"):
            return int(line.split()[1])
    return 0


def load_or_build(n: int, x: np.ndarray, index_dir: Path | None):
    import faiss

    from exvae_dist.config import IndexConfig
    from exvae_dist.retrieval.index import build_index

    path = index_dir / f"ivf_{n}.faiss" if index_dir else None
    if path is not None and path.exists():
        return faiss.read_index(str(path))
    start = time.perf_counter()
    index = build_index(np.ascontiguousarray(x[:n]), IndexConfig(kind="auto", auto_exact_below=0))
    print(f"N={n:.0e}: built in {time.perf_counter() - start:.0f} s", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        faiss.write_index(index, str(tmp))
        tmp.rename(path)
        index = faiss.read_index(str(path))  # searched as loaded, like every later run
    return index


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    import faiss

    from exvae_dist.retrieval.index import recall_at_k

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latents", required=True, help="[N + 128, d] float32 .npy")
    parser.add_argument("--sizes", default="1e5,1e6")
    parser.add_argument("--index-dir", type=Path, default=None,
                        help="keep built indexes here and reuse them (default: build each run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    x, queries, sizes = held_out_latents(args.latents, args.sizes)
    indexes = {n: load_or_build(n, x, args.index_dir) for n in sizes}
    times = {(n, part): [] for n in sizes for part in ("coarse", "whole")}
    for _ in range(args.rounds):
        for n, index in indexes.items():
            ivf = faiss.extract_index_ivf(index)
            times[(n, "coarse")].append(best_of(lambda: ivf.quantizer.search(queries, ivf.nprobe)))
            times[(n, "whole")].append(best_of(lambda: index.search(queries, 10)))
    per_query = {key: statistics.median(v) * 1e6 / len(queries) for key, v in times.items()}
    base = sizes[0]
    print(f"\n{args.threads} threads, {len(queries)} queries per batch, k = 10, microseconds per "
          f"query; anonymous memory on huge pages: {anon_huge_pages_kb() / 1024:.0f} MB\n")
    print("| N | index (nprobe) | recall@10 | coarse us | whole us | whole - coarse us "
          f"| whole / N={base:.0e} | (whole - coarse) / N={base:.0e} |")
    print("|---|---|---|---|---|---|---|---|")
    for n, index in indexes.items():
        ivf = faiss.extract_index_ivf(index)
        truth = faiss.knn(queries, np.ascontiguousarray(x[:n]), 10)[1]
        recall = recall_at_k(index.search(queries, 10)[1], truth)
        coarse, whole = per_query[(n, "coarse")], per_query[(n, "whole")]
        lists, base_lists = whole - coarse, per_query[(base, "whole")] - per_query[(base, "coarse")]
        print(f"| {n:.0e} | IVF{ivf.nlist} ({ivf.nprobe}) | {recall:.3f} | {coarse:.1f} | "
              f"{whole:.1f} | {lists:.1f} | {whole / per_query[(base, 'whole')]:.2f} | "
              f"{lists / base_lists:.2f} |")


if __name__ == "__main__":
    main()
