"""Index and index-service benchmark: build time, queries/s and recall@10 of each index kind
against exact search in the same run; service round trip vs a no-op actor call; query time
during a rebuild vs idle; peak RSS per N.

    python bench/bench_index.py                       # quick: N = 1e5, 1e6 (a couple of minutes)
    python bench/bench_index.py --sizes 1e5,1e6,1e7   # the 1e7 run takes ~15 min, ~8 GB RAM
    python bench/bench_index.py --service-size 0      # skip the Ray service part

Latents are synthetic and clustered (100 Gaussian clusters, unit centres, unit spread, d=40).
Each N runs in its own child process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

D, K, BATCH = 40, 10, 128


def clustered(n: int, d: int = D, n_clusters: int = 100, seed: int = 0) -> np.ndarray:
    """[n, d] float32 Gaussian mixture, generated in blocks to keep peak memory at ~1x."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for lo in range(0, n, 1_000_000):
        hi = min(n, lo + 1_000_000)
        out[lo:hi] = centres[rng.integers(0, n_clusters, hi - lo)]
        out[lo:hi] += rng.standard_normal((hi - lo, d), dtype=np.float32)
    return out


def qps(index, queries: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    """Queries per second in batches of BATCH (best of `repeats` passes) and the ids found."""
    from exvae_dist.retrieval.index import search

    best = float("inf")
    ids = None
    for _ in range(repeats):
        start = time.perf_counter()
        ids = np.concatenate([search(index, queries[i:i + BATCH], K)[0]
                              for i in range(0, len(queries), BATCH)])
        best = min(best, time.perf_counter() - start)
    return len(queries) / best, ids


def bench_size(n: int, threads: int) -> dict:
    """One N: every index kind against exact search, in this process."""
    import faiss

    from exvae_dist.config import IndexConfig
    from exvae_dist.retrieval.index import build_index, describe, recall_at_k

    faiss.omp_set_num_threads(threads)
    n_queries = 1024 if n <= 1_000_000 else 512
    data = clustered(n + n_queries, seed=1)
    latents, queries = data[:n], data[n:]
    kinds = {
        "flat (exact)": IndexConfig(kind="flat"),
        "ivfpq, no re-rank": IndexConfig(kind="ivfpq", refine_factor=0),
        "ivfpq + re-rank (default)": IndexConfig(kind="ivfpq"),
        "ivfpq + re-rank, 2 shards": IndexConfig(kind="ivfpq", shards=2),
    }
    rows, truth = [], None
    for name, cfg in kinds.items():
        start = time.perf_counter()
        index = build_index(latents, cfg)
        build_s = time.perf_counter() - start
        rate, ids = qps(index, queries, repeats=2 if n <= 1_000_000 else 1)
        if truth is None:
            truth = ids  # the exact index comes first
        rows.append({"n": n, "kind": name, "index": describe(index), "build_s": build_s,
                     "qps": rate, "recall": recall_at_k(ids, truth)})
        del index
    auto = IndexConfig()
    rows.append({"n": n, "auto_kind": "flat" if n < auto.auto_exact_below else "ivfpq"})
    return {"rows": rows, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def bench_service(n: int, threads: int) -> dict:
    """The Ray actor: round trip vs a no-op actor, query latency during a rebuild vs idle."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from exvae_dist.config import IndexConfig
    from exvae_dist.retrieval.service import start_index_service, wait_for_version
    from exvae_dist.retrieval.store import ExemplarStore

    @ray.remote(num_cpus=0)
    class NoOp:
        def ping(self, *args):
            return None

    def publish(store, v, latents):
        store.begin_version(v)
        for w in range(4):
            lo, hi = store.row_range(w, 4)
            store.write_rows(v, lo, latents[lo:hi])
        store.mark_complete(v)

    def latency(fn, calls):
        out = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return np.array(out)

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        latents = clustered(n, seed=2)
        queries = clustered(BATCH, seed=3)
        store = ExemplarStore.create(Path(tmp) / "store.zarr", np.zeros((n, 1), np.uint8), D)
        publish(store, 1, latents)
        cfg = IndexConfig(service_threads=threads)
        handle = start_index_service(str(store.path), cfg)
        status = wait_for_version(handle, 1, timeout=600)
        noop = NoOp.remote()
        ray.get(noop.ping.remote())
        ray.get(handle.search.remote(queries, K))
        noop_s = latency(lambda: ray.get(noop.ping.remote(queries, K)), 300)
        idle_s = latency(lambda: ray.get(handle.search.remote(queries, K)), 300)
        # rebuild: same table + a small shift, so the build costs what a real refresh does
        publish(store, 2, latents + 0.01)
        during, done = [], threading.Event()

        def watch():
            wait_for_version(handle, 2, timeout=600)
            done.set()

        watcher = threading.Thread(target=watch)
        ray.get(handle.refresh.remote(2))
        watcher.start()
        rebuild_start = time.perf_counter()
        while not done.is_set():
            start = time.perf_counter()
            _, _, version = ray.get(handle.search.remote(queries, K))
            if version == 1:  # answered while version 2 was being built
                during.append(time.perf_counter() - start)
        rebuild_s = time.perf_counter() - rebuild_start
        watcher.join()
        ray.kill(handle)
    ray.shutdown()
    med = lambda a: float(np.median(a)) * 1e3  # noqa: E731
    return {"n": n, "index": status["kind"], "build_s": status["build_seconds"],
            "noop_ms": med(noop_s), "search_ms": med(idle_s),
            "during_rebuild_ms": med(during) if during else float("nan"),
            "queries_during_rebuild": len(during), "rebuild_wall_s": rebuild_s}


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         cwd=REPO)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"child {args} failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6", help="comma-separated N, e.g. 1e5,1e6,1e7")
    parser.add_argument("--service-size", default="1e6",
                        help="N for the Ray service measurements (0 = skip)")
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads")
    parser.add_argument("--child-size", help=argparse.SUPPRESS)
    parser.add_argument("--child-service", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_size:
        print(json.dumps(bench_size(int(float(args.child_size)), args.threads)))
        return
    if args.child_service:
        print(json.dumps(bench_service(int(float(args.child_service)), args.threads)))
        return

    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    results = {}
    print(f"d={D}, k={K}, batches of {BATCH} queries, {args.threads} FAISS threads; recall@10 "
          f"against the exact flat index of the same run", flush=True)
    print(f"| N | index | build s | queries/s | recall@10 |\n|---|---|---|---|---|", flush=True)
    for n in sizes:
        res = run_child(["--child-size", str(n), "--threads", str(args.threads)])
        results[n] = res
        for row in res["rows"]:
            if "kind" in row:
                print(f"| {n:.0e} | {row['kind']}: {row['index']} | {row['build_s']:.1f} | "
                      f"{row['qps']:,.0f} | {row['recall']:.3f} |", flush=True)
    print("\n| N | peak RSS GB | kind=auto picks | auto queries/s |\n|---|---|---|---|")
    auto_qps = {}
    for n, res in results.items():
        pick = res["rows"][-1]["auto_kind"]
        name = "flat (exact)" if pick == "flat" else "ivfpq + re-rank (default)"
        auto_qps[n] = next(r["qps"] for r in res["rows"] if r.get("kind") == name)
        print(f"| {n:.0e} | {res['peak_rss_gb']:.2f} | {pick} | {auto_qps[n]:,.0f} |")
    if len(sizes) > 1:
        lo, hi = min(sizes), max(sizes)
        print(f"\nquery time at N={hi:.0e} / at N={lo:.0e} (kind=auto): "
              f"{auto_qps[lo] / auto_qps[hi]:.2f}x (target <= 1.5x)")
        ivf = {n: next(r["qps"] for r in res["rows"] if r.get("kind") ==
                       "ivfpq + re-rank (default)") for n, res in results.items()}
        print(f"query time at N={hi:.0e} / at N={lo:.0e} (ivfpq + re-rank both): "
              f"{ivf[lo] / ivf[hi]:.2f}x")

    service_n = int(float(args.service_size))
    if service_n:
        s = run_child(["--child-service", str(service_n), "--threads", str(args.threads)])
        print(f"\nservice at N={service_n:.0e} ({s['index']}, built in {s['build_s']:.1f} s), "
              f"one call = {BATCH} x {D} queries, k={K}, medians of 300 calls:")
        print(f"| no-op actor call ms | service search ms | ratio | search during rebuild ms "
              f"| rebuild / idle | queries answered during rebuild |")
        print("|---|---|---|---|---|---|")
        print(f"| {s['noop_ms']:.2f} | {s['search_ms']:.2f} | {s['search_ms'] / s['noop_ms']:.1f}x "
              f"| {s['during_rebuild_ms']:.2f} | {s['during_rebuild_ms'] / s['search_ms']:.2f}x "
              f"| {s['queries_during_rebuild']} in {s['rebuild_wall_s']:.1f} s |")


if __name__ == "__main__":
    main()
