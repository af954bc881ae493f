"""Index and index-service benchmark: build time, queries/s and recall@10 of kind=auto's IVF
(IVF<N/64>_HNSW32,Flat, nprobe calibrated to recall 0.95 at build) with 1 and 2 shards
against exact search in the same run, peak RSS per N; service round trip with 1 and 2 shard
actors (exact and IVF) vs a no-op actor call.

    python bench/bench_index.py                       # quick: N = 1e5, 1e6
    python bench/bench_index.py --sizes 1e5,1e6,1e7   # 1e7 needs ~6 GB RAM and many minutes
    python bench/bench_index.py --service-size 0      # skip the Ray service part
    python bench/bench_index.py --data deformed --encoder runs/mnist_vae_gaussian

Latents: --data synthetic (default): 100 Gaussian clusters, unit centres, unit spread, d=40,
every dimension used (the hard case for any index); --data deformed: the encoder means of
deformed MNIST digits (exvae_dist/data/deformed.py) under a trained run's encoder, i.e. what
a training run at that N indexes (made once into --cache; ~1 min per 1e6 rows per core).
Each N runs in its own child process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
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


def deformed_latents(n: int, encoder: str, cache: Path, block: int = 8192) -> np.ndarray:
    """[n, d] float32 encoder means of deformed-MNIST rows 0..n-1 (exvae_dist/data/deformed.py,
    seed 0): the latents a real run at that N indexes. encoder: a trained run folder. Made once
    per (encoder checkpoint, n) into `cache` (temp name, then rename) and memory-mapped after."""
    import hashlib

    ckpt = _checkpoint_of(encoder)
    tag = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:12]
    path = cache / f"deformed_{n}_{tag}.npy"
    if not path.exists():
        import torch

        from exvae_dist.evaluation.runs import load_run
        from exvae_dist.data.ingest import DeformedMnistSource
        from exvae_dist.core.objective import encode_means

        torch.set_num_threads(1)
        net = load_run(str(ckpt)).model.net
        source = DeformedMnistSource(n, seed=0, data_root=os.environ.get("EXVAE_DATA_DIR"))
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                        shape=(n, net.top_dim))
        start = time.perf_counter()
        for lo in range(0, n, block):
            rows = np.arange(lo, min(n, lo + block))
            images, _ = source.read(rows)
            x = torch.from_numpy(images.reshape(len(rows), -1)).float().div_(255)
            out[lo:lo + len(rows)] = encode_means(net, x).numpy()
            if lo // block % 100 == 0:
                print(f"deformed latents {lo + len(rows):,} / {n:,} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        out.flush()
        del out
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def _checkpoint_of(encoder: str) -> Path:
    from exvae_dist.runs.checkpoint import find_checkpoint

    return find_checkpoint(Path(encoder), prefer_best=True)


def held_out_latents(path: str, sizes: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """--latents / --sizes of the scripts that index rows 0 .. N-1 of one [N + 128, d] .npy
    and query its last 128 rows (none of them indexed): (latents memory-mapped, queries,
    sizes); exits with a message when the file has too few rows for the sizes."""
    x = np.load(path, mmap_mode="r")
    queries = np.ascontiguousarray(x[-BATCH:])
    counts = [int(float(s)) for s in sizes.split(",")]
    if max(counts) > len(x) - BATCH:
        sys.exit(f"--latents has {len(x) - BATCH} rows to index, fewer than --sizes asks for")
    return x, queries, counts


def qps(parts, queries: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    """Queries per second in batches of BATCH (best of `repeats` passes) and the ids found.

    parts: [(index, first_row)], one per shard, searched one after the other and merged by
    index.merge_topk, as ShardedSearch merges its shards' answers (in the service the shards
    run in parallel, one per actor; here they share this process's threads).
    """
    from exvae_dist.retrieval.index import merge_topk, search

    best = float("inf")
    ids = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = []
        for i in range(0, len(queries), BATCH):
            answers = [search(index, queries[i:i + BATCH], K) for index, _ in parts]
            out.append(merge_topk([a[0] + lo for a, (_, lo) in zip(answers, parts)],
                                  [a[1] for a in answers], K)[0])
        ids = np.concatenate(out)
        best = min(best, time.perf_counter() - start)
    return len(queries) / best, ids


def nprobe_sweep(index, queries: np.ndarray, truth: np.ndarray, nprobes) -> list[dict]:
    """queries/s and recall@10 of one built IVF at other nprobe values (the HNSW walk as
    index.set_nprobe sets it); the index is left as it was."""
    import faiss

    from exvae_dist.retrieval.index import recall_at_k, set_nprobe

    ivf = faiss.extract_index_ivf(index)
    saved = ivf.nprobe
    out = []
    for nprobe in nprobes:
        set_nprobe(index, nprobe)
        rate, ids = qps([(index, 0)], queries, repeats=3)
        out.append({"nprobe": nprobe, "qps": rate, "recall": recall_at_k(ids, truth)})
    set_nprobe(index, saved)
    return out


def latents_and_queries(n: int, data: str, total: int, encoder: str = "",
                        cache: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The first n latents and BATCH queries that are not among them. synthetic: the
    clustered mixture. deformed: encoder means of deformed MNIST, the queries being rows
    [total, total + BATCH) (the same queries at every N of a run)."""
    if data == "synthetic":
        x = clustered(n + BATCH, seed=1)
        return x[:n], x[n:]
    x = deformed_latents(total + BATCH, encoder, Path(cache))
    return x[:n], np.ascontiguousarray(x[total:total + BATCH])  # rows stay memory-mapped


def bench_size(n: int, threads: int, shard_counts: tuple[int, ...] = (1, 2),
               nprobes: tuple[int, ...] = (), source: tuple = ("synthetic", 0),
               keep: str = "") -> dict:
    """One N: exact search, then kind=auto's IVF over each of shard_counts, in this process."""
    import faiss

    from exvae_dist.config import IndexConfig
    from exvae_dist.retrieval.index import build_index, describe, recall_at_k

    faiss.omp_set_num_threads(threads)
    latents, queries = latents_and_queries(n, *source)
    ivf = IndexConfig(kind="auto", auto_exact_below=0)  # the IVF at every N, 1e5 included
    kinds = {"flat (exact)": (IndexConfig(kind="flat"), 1)}
    kinds.update({f"auto IVF, {s} shard{'s' if s > 1 else ''}": (ivf, s) for s in shard_counts})
    rows, truth = [], None
    for name, (cfg, shards) in kinds.items():
        bounds = [n * s // shards for s in range(shards + 1)]
        start = time.perf_counter()
        parts = [(build_index(latents[lo:hi], cfg), lo) for lo, hi in zip(bounds, bounds[1:])]
        build_s = time.perf_counter() - start
        rate, ids = qps(parts, queries, repeats=5)
        stats = faiss.cvar.indexIVF_stats
        stats.reset()
        qps(parts, queries, repeats=1)  # one more pass, counted: work per query
        ndis = stats.ndis / len(queries)  # vectors compared in the lists (0 for flat)
        # CPU ms per query (summed over threads): the HNSW walk over the centroids, the lists
        coarse_ms = stats.quantization_time / len(queries)
        if truth is None:
            truth = ids  # the exact index comes first
        rows.append({"n": n, "kind": name, "index": describe(parts[0][0]), "build_s": build_s,
                     "qps": rate, "recall": recall_at_k(ids, truth), "ndis": ndis,
                     "coarse_ms": coarse_ms, "lists_ms": stats.search_time / len(queries),
                     "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
        if shards == 1 and cfg.kind == "auto" and nprobes:
            rows[-1]["sweep"] = nprobe_sweep(parts[0][0], queries, truth, nprobes)
        if keep:  # for the interleaved timing across N (bench_timing)
            folder = Path(keep) / kept_folder(n, name)
            folder.mkdir(parents=True, exist_ok=True)
            for s, (index, lo) in enumerate(parts):
                faiss.write_index(index, str(folder / f"shard{s}_{lo}.faiss"))
            np.save(folder / "queries.npy", queries)
        del parts
    auto = IndexConfig()
    rows.append({"n": n, "auto_kind": "flat" if n < auto.auto_exact_below else "ivfhnsw"})
    return {"rows": rows, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def kept_folder(n: int, kind: str) -> str:
    """The folder name a size child keeps an index of `kind` at N in (bench_timing's key)."""
    return f"{n}_{kind.replace(' ', '_')}"


def bench_timing(keep: str, threads: int, rounds: int) -> dict:
    """queries/s of every index the size children kept, measured in ONE process, each index
    in turn every round (best of 3 passes), the median over rounds: the load of a shared machine hits every N
    alike, so the ratios across N are sound (each size child ran at its own time)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    folders = sorted(p for p in Path(keep).iterdir() if p.is_dir())
    loaded = {}
    for folder in folders:
        shards = sorted(folder.glob("shard*.faiss"), key=lambda p: int(p.stem.split("_")[0][5:]))
        parts = [(faiss.read_index(str(p)), int(p.stem.split("_")[1])) for p in shards]
        loaded[folder.name] = (parts, np.load(folder / "queries.npy"))
    times = {name: [] for name in loaded}
    for _ in range(rounds):
        for name, (parts, queries) in loaded.items():
            # best of 3 passes, then the median; one pass of an exact index (25 s at 1e7)
            rate, _ = qps(parts, queries, repeats=1 if "flat" in name else 3)
            times[name].append(len(queries) / rate)
    return {name: len(loaded[name][1]) / float(np.median(t)) for name, t in times.items()}


def bench_service(n: int, threads: int) -> dict:
    """Ray actors: a search through ShardedSearch over 1 and 2 shards vs a no-op actor call."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from exvae_dist.config import IndexConfig
    from exvae_dist.retrieval.service import start_index_shards
    from exvae_dist.retrieval.store import ExemplarStore
    from exvae_dist.train.service_client import ShardedSearch
    from exvae_dist.train.driver import start_local_ray_without_dashboard

    @ray.remote(num_cpus=0)
    class NoOp:
        def ping(self, *args):
            return None

    def latency(fn, calls):
        out = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return np.array(out)

    start_local_ray_without_dashboard(2, log_to_driver=False, configure_logging=False)
    med = lambda a: float(np.median(a)) * 1e3  # noqa: E731
    result = {"n": n}
    with tempfile.TemporaryDirectory() as tmp:
        latents = clustered(n, seed=2)
        queries = clustered(BATCH, seed=3)
        store = ExemplarStore.create(Path(tmp) / "store.zarr", np.zeros((n, 1), np.uint8), D)
        store.begin_version(1)
        store.write_rows(1, 0, latents)
        store.mark_complete(1)
        noop = NoOp.remote()
        ray.get(noop.ping.remote())
        result["noop_ms"] = med(latency(lambda: ray.get(noop.ping.remote(queries, K)), 200))
        # kind=auto as configured (exact below auto_exact_below), and its IVF at this N
        kinds = {"auto": IndexConfig(service_threads=threads),
                 "ivf": IndexConfig(service_threads=threads, auto_exact_below=0)}
        for kind, cfg in kinds.items():
            for shards in (1, 2):
                handles = start_index_shards(str(store.path), cfg, shards=shards)
                client = ShardedSearch(handles)
                status = client.wait_served(1, timeout=1200)
                client.search(queries, K)
                result[f"{kind}_ms_{shards}"] = med(latency(lambda: client.search(queries, K),
                                                            200))
                result[f"{kind}_index_{shards}"] = status["kind"]
                for h in handles:
                    ray.kill(h)
    ray.shutdown()
    return result


def run_child(args: list[str]) -> dict:
    # the child's log (build phases, calibrated nprobe) goes straight to this stderr
    out = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                         cwd=REPO)
    if out.returncode:
        raise SystemExit(f"child {args} failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6", help="comma-separated N, e.g. 1e5,1e6,1e7")
    parser.add_argument("--service-size", default="1e5",
                        help="N for the Ray service measurements (0 = skip)")
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads")
    parser.add_argument("--shards", default="1,2",
                        help="comma-separated shard counts of the IVF, e.g. 1 to skip 2 shards")
    parser.add_argument("--nprobe-sweep", default="",
                        help="also search the 1-shard IVF at these nprobe values, e.g. 128,256")
    parser.add_argument("--data", choices=("synthetic", "deformed"), default="synthetic",
                        help="synthetic: 100 Gaussian clusters in 40-d (full intrinsic "
                             "dimension, the hard case); deformed: encoder means of deformed "
                             "MNIST (what a run at that N indexes; needs --encoder)")
    parser.add_argument("--encoder", default="",
                        help="--data deformed: a trained run folder (or checkpoint) whose "
                             "encoder makes the latents, e.g. runs/mnist_vae_gaussian")
    parser.add_argument("--cache", default=str(REPO / "bench" / "out" / "latents"),
                        help="--data deformed: where the latents are kept between runs "
                             "(~160 MB per 1e6 rows)")
    parser.add_argument("--json", help="also write the per-N results to this JSON file")
    parser.add_argument("--workdir", default=None,
                        help="where the built indexes wait for the interleaved timing "
                             "(default: the system's temp folder; ~5 GB at N = 1e7)")
    parser.add_argument("--child-size", help=argparse.SUPPRESS)
    parser.add_argument("--child-service", help=argparse.SUPPRESS)
    parser.add_argument("--total", default="0", help=argparse.SUPPRESS)
    parser.add_argument("--child-timing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-latents", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=11,
                        help="interleaved timing rounds across N (median per index)")
    args = parser.parse_args()
    if args.child_size or args.child_service:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("exvae_dist.retrieval.index").setLevel(logging.INFO)
    if args.child_size:
        shard_counts = tuple(int(s) for s in args.shards.split(",") if s)
        nprobes = tuple(int(p) for p in args.nprobe_sweep.split(",") if p)
        source = (args.data, int(args.total), args.encoder, args.cache)
        print(json.dumps(bench_size(int(float(args.child_size)), args.threads, shard_counts,
                                    nprobes, source, args.keep)))
        return
    if args.child_timing:
        print(json.dumps(bench_timing(args.keep, args.threads, args.rounds)))
        return
    if args.child_service:
        print(json.dumps(bench_service(int(float(args.child_service)), args.threads)))
        return
    if args.child_latents:
        deformed_latents(int(args.total), args.encoder, Path(args.cache))
        print(json.dumps({}))
        return

    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    results = {}
    if args.data == "deformed":
        if not args.encoder:
            parser.error("--data deformed needs --encoder RUN (a trained MNIST run folder)")
        # made once, in a child: a child inherits its parent's RSS into its peak (ru_maxrss
        # survives fork and exec), so the parent must never hold the latents itself
        run_child(["--child-latents", "--total", str(max(sizes) + BATCH),
                   "--encoder", args.encoder, "--cache", args.cache])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    keep = tempfile.mkdtemp(prefix="bench_index_", dir=args.workdir)  # built indexes, for timing
    print(f"d={D}, k={K}, {BATCH} queries in batches of {BATCH}, {args.threads} FAISS threads; "
          f"recall@10 against the exact flat index of the same run", flush=True)
    print("| N | index | build s | queries/s | recall@10 | peak RSS GB so far | vectors "
          "scanned / query | HNSW walk share of search CPU |\n|---|---|---|---|---|---|---|---|", flush=True)
    for n in sizes:
        res = run_child(["--child-size", str(n), "--threads", str(args.threads),
                         "--data", args.data, "--encoder", args.encoder, "--cache", args.cache,
                         "--total", str(max(sizes)),
                         "--shards", args.shards, "--nprobe-sweep", args.nprobe_sweep,
                         "--keep", keep])
        results[n] = res
        if args.json:  # after every N, so that a long run killed later keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=1))
        for row in res["rows"]:
            if "kind" in row:
                print(f"| {n:.0e} | {row['kind']}: {row['index']} | {row['build_s']:.1f} | "
                      f"{row['qps']:,.0f} | {row['recall']:.3f} | {row['rss_gb']:.2f} | "
                      f"{row['ndis']:,.0f} | "
                      f"{row['coarse_ms'] / max(1e-9, row['coarse_ms'] + row['lists_ms']):.0%} |",
                      flush=True)
    if args.nprobe_sweep:
        print("\nnprobe sweep, 1-shard IVF (HNSW efSearch = max(16, nprobe)):\n"
              "| N | nprobe | queries/s | recall@10 |\n|---|---|---|---|")
        for n in sizes:
            for row in results[n]["rows"]:
                for p in row.get("sweep", []):
                    print(f"| {n:.0e} | {p['nprobe']} | {p['qps']:,.0f} | {p['recall']:.3f} |")
    timing = run_child(["--child-timing", "--keep", keep, "--threads", str(args.threads),
                        "--rounds", str(args.rounds)])
    shutil.rmtree(keep)
    kinds = [r["kind"] for r in results[sizes[0]]["rows"] if "kind" in r]
    print(f"\nqueries/s measured in one process, {args.rounds} rounds of each index in turn "
          f"(best of 3 passes, exact: 1 pass), the median over rounds:\n| N | " + " | ".join(kinds) + " |\n|---|"
          + "---|" * len(kinds))
    for n in sizes:
        print(f"| {n:.0e} | " + " | ".join(f"{timing[kept_folder(n, k)]:,.0f}" for k in kinds) + " |")
    if args.json:
        results["interleaved_qps"] = timing
        Path(args.json).write_text(json.dumps(results, indent=1))
    if len(sizes) > 1:
        lo, hi = min(sizes), max(sizes)
        rate = lambda n, kind: timing[kept_folder(n, kind)]  # noqa: E731
        for kind in kinds[::-1]:
            print(f"query time at N={hi:.0e} / at N={lo:.0e}, {kind}: "
                  f"{rate(lo, kind) / rate(hi, kind):.2f}x (target for the IVF <= 1.5x)")
        pick = lambda n: ("flat (exact)" if results[n]["rows"][-1]["auto_kind"] == "flat"  # noqa
                          else "auto IVF, 1 shard")
        print(f"kind=auto with its default exact threshold ({pick(lo)} at {lo:.0e}, "
              f"{pick(hi)} at {hi:.0e}): {rate(lo, pick(lo)) / rate(hi, pick(hi)):.2f}x")

    service_n = int(float(args.service_size))
    if service_n:
        s = run_child(["--child-service", str(service_n), "--threads", str(args.threads)])
        print(f"\nservice at N={service_n:.0e}, one call = {BATCH} x {D} queries, k={K}, "
              f"medians of 200 calls; no-op actor call carrying the same array: "
              f"{s['noop_ms']:.2f} ms")
        print("| index (1 shard) | 1 shard ms | 2 shards ms | 1 shard / no-op | "
              "2 shards / no-op |\n|---|---|---|---|---|")
        for kind in ("auto", "ivf"):
            one, two = s[f"{kind}_ms_1"], s[f"{kind}_ms_2"]
            print(f"| {s[f'{kind}_index_1']} | {one:.2f} | {two:.2f} | "
                  f"{one / s['noop_ms']:.1f}x | {two / s['noop_ms']:.1f}x |")


if __name__ == "__main__":
    main()
