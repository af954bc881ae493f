"""Refresh-to-served at N exemplars: encode a new latent version, build its index, swap it in.

Per N, one deformed-MNIST store (data/ingest's DeformedMnistSource, built in the run) and
two consecutive weights of a trained encoder (--before / --after: checkpoints one epoch
apart, so the latents move as much as they do between two refreshes). Version 1 is encoded
with --before and built (k-means); version 2 with --after. Then version 2's index is built
in each of IndexBuilder's ways (--ways), alternating over --rounds, each by a fresh
IndexHolder (the index service's own code, its one build thread) whose builder holds what
version 1's build left:

- kmeans: nothing kept: version 2 runs the k-means, as every version did before issue 31;
- assign: version 1's centroids kept, every row assigned afresh (the HNSW walk), as
          IndexBuilder did from e63566e;
- lists:  version 1's lists kept, centroids moved to their rows' means (IndexBuilder now).

Printed per N: encode s (torch threads --threads; version 2 is encoded --rounds times each
way, alternating: the image layer in float32 as before core/int8.py, and in int8 as the
refresh does now where the CPU can), build s and refresh-to-served s (refresh
call -> the new version answers; the swap is one reference assignment; FAISS and torch at
service.BUILD_THREADS, as in the index actor) per way, recall@10
of each version-2 index on --queries of its own rows against exact search (FAISS knn, own
row left out, as RAT leaves it out; the truth computed once per N), and which way the
builder took (a kept way whose calibration says stale falls through to the next).

Step during a rebuild: bench_scale's RAT step (a worker's step minus the index query: batch
and candidate rows read by id from the store, train_step of the paper's MLP VAE) at
--step-threads torch threads, timed while nothing builds (quiet) and while a holder builds
version 2 in each way (again and again, fresh holders, until --min-steps are timed); medians,
and their ratio to quiet. The build runs in the holder's
build thread with service.BUILD_THREADS (1) FAISS threads, beside the step's threads.

    EXVAE_DATA_DIR=../shared/data python bench/bench_refresh.py --sizes 1e5,1e6 \\
        --before /tmp/fast_ckpts/epoch_a.pt --after /tmp/fast_ckpts/epoch_b.pt
    # 1e7: one round, no step timing, no k-means of version 2 (the store alone takes ~12 min
    # to make here, each k-means ~14 min)
    EXVAE_DATA_DIR=../shared/data python bench/bench_refresh.py --sizes 1e7 --rounds 1 \\
        --no-step --ways assign,lists --before /tmp/fast_ckpts/epoch_a.pt \\
        --after /tmp/fast_ckpts/epoch_b.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def load_net(path: str, image_shape):
    import torch

    from exvae_dist import config as config_mod
    from exvae_dist.core.objective import build_model
    from exvae_dist.runs.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    cfg = config_mod.from_dict(state["config"]) if "config" in state else \
        config_mod.load("mnist_vae_exemplar", [], env={})
    model = build_model(cfg, tuple(image_shape))
    model.load_state_dict(state["model"])
    model.eval()
    torch.set_grad_enabled(False)
    return model.net


def exact_truth(latents: np.ndarray, queries: int, seed: int = 0):
    """(rows, their 10 nearest other rows): exact search (FAISS knn), own row left out."""
    import faiss

    rows = np.sort(np.random.default_rng(seed).choice(len(latents), queries, replace=False))
    _, truth = faiss.knn(latents[rows], latents, 11)
    return rows, [[i for i in t if i != r][:10] for r, t in zip(rows, truth)]


def recall_at_10(index, latents: np.ndarray, truth) -> float:
    rows, nearest = truth
    _, found = index.search(latents[rows], 11)
    return float(np.mean([len(set(i for i in f if i != r) & set(t)) / 10
                          for r, f, t in zip(rows, found, nearest)]))


def holder_after_version_1(path, cfg, kept_state, way: str):
    """A fresh IndexHolder whose builder holds what version 1's build left: nothing (way
    kmeans), version 1's centroids (assign) or its centroids and lists (lists). The bench
    sets the builder's private state so that every way starts from the same version 1."""
    from exvae_dist.retrieval.service import IndexHolder

    holder = IndexHolder(str(path), cfg, load_latest=False)
    if way != "kmeans":
        trained, lists, scan = kept_state
        builder = holder._builder
        builder._trained, builder._trained_scan = trained, scan
        builder._lists = lists if way == "lists" else None
    return holder


def step_ms(step, first: int, count: int = 0, holders=None, version: int = 0,
            min_steps: int = 0) -> tuple[float, int, int]:
    """Median ms of RAT steps: `count` of them, or (`holders` given: a function making a
    fresh holder) as many as fit while holders build `version`, one build after another
    until at least `min_steps` are timed (a 1e5 build spans a handful of steps). Returns
    (median ms, steps timed, next step number)."""
    times, i = [], first

    def building(holder) -> bool:
        status = holder.status()
        if status["failed_version"] == version:  # a failed build would be waited on forever
            raise RuntimeError(f"version {version}'s build failed: {status['last_error']}")
        return (status["version"] or 0) < version

    while len(times) < (count if holders is None else max(1, min_steps)):
        holder = holders() if holders is not None else None
        try:
            if holder is not None:
                holder.refresh(version)
            while (len(times) < count) if holder is None else building(holder):
                t = time.perf_counter()
                step(i)
                times.append(1000 * (time.perf_counter() - t))
                i += 1
        finally:
            if holder is not None:
                holder.close()
    return (float(np.median(times)) if times else float("nan")), len(times), i


def served_seconds(holder, version: int, threads: int) -> float:
    """Refresh call -> `version` served, with torch at `threads` meanwhile: the index
    actor's process runs torch (the calibration's exact search) on one thread (Ray sets
    OMP_NUM_THREADS=1 in a num_cpus=0 actor), and torch's count is process-wide."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = time.perf_counter()
        holder.refresh(version)
        holder.wait_for_version(version, timeout=3600)
        return time.perf_counter() - t
    finally:
        torch.set_num_threads(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e5,1e6")
    ap.add_argument("--before", required=True, help="checkpoint of the encoder for version 1")
    ap.add_argument("--after", required=True, help="the next epoch's checkpoint (version 2)")
    ap.add_argument("--ways", default=",".join(WAYS),
                    help=f"IndexBuilder ways to build version 2 with, of {','.join(WAYS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the encoding")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--step-threads", type=int, default=1,
                    help="torch threads of the RAT step timed during a rebuild")
    ap.add_argument("--min-steps", type=int, default=60,
                    help="steps to time during each way's builds (version 2 is built again "
                         "until there are this many)")
    ap.add_argument("--no-step", dest="step", action="store_false",
                    help="skip the step timing (at 1e7 it costs more builds)")
    args = ap.parse_args()
    ways = args.ways.split(",")
    if not set(ways) <= set(WAYS):
        ap.error(f"--ways: {args.ways!r} is not a subset of {','.join(WAYS)}")

    import torch

    from exvae_dist.config import IndexConfig
    from exvae_dist.core import objective
    from exvae_dist.core.int8 import int8_dot_products
    from exvae_dist.data import ingest as ingest_mod
    from exvae_dist.retrieval.service import BUILD_THREADS
    from exvae_dist.retrieval.store import ExemplarStore
    from exvae_dist.train.refresh import encode_into_version
    from exvae_dist.train.store_images import StoreImages
    sys.path.insert(0, str(REPO / "bench"))
    from bench_scale import make_rat_step

    torch.set_num_threads(args.threads)
    int8_available = int8_dot_products()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_refresh_"))
    cfg = IndexConfig()  # kind=auto as shipped
    # a kind=auto IVF at every N here (below auto_exact_below the cache is in the workers)
    ivf = dataclasses.replace(cfg, auto_exact_below=0)
    rows_out = []
    for n in (int(float(s)) for s in args.sizes.split(",")):
        def log(what):
            print(f"N={n}: {what} ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)

        path = work / f"deformed_{n}"
        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        source = ingest_mod.DeformedMnistSource(n, seed=0, data_root=os.environ.get("EXVAE_DATA_DIR"))
        ingest_mod.ingest(source, path, progress=False)
        log(f"store built in {time.perf_counter() - t:.0f} s")
        store = ExemplarStore(path)
        images = StoreImages(store, cache_bytes=0)
        encode = {}
        for version, ckpt in ((1, args.before), (2, args.after)):
            net = load_net(ckpt, store.image_shape)
            store.claim_version()
            # version 2: the image layer in float32 (as before core/int8.py) and in int8,
            # alternated over --rounds, int8 last (the rows kept); medians
            times = {"float32": [], "int8": []}
            for _ in range(args.rounds if version == 2 else 0):
                for precision in times:
                    with mock.patch.object(objective, "int8_dot_products",
                                           lambda: precision == "int8" and int8_available):
                        t = time.perf_counter()
                        encode_into_version(store, version, net, images, 0, store.n)
                        times[precision].append(time.perf_counter() - t)
            if version == 1:
                t = time.perf_counter()
                encode_into_version(store, version, net, images, 0, store.n)
                times["int8"].append(time.perf_counter() - t)
            store.mark_complete(version)
            encode[version] = float(np.median(times["int8"]))
            encode["float32"] = float(np.median(times["float32"] or [np.nan]))
        first = holder_after_version_1(path, ivf, None, "kmeans")
        first_s = served_seconds(first, 1, BUILD_THREADS)
        builder = first._builder
        kept_state = (builder._trained, builder._lists, builder._trained_scan)
        first.close()
        log(f"encode {encode[1]:.0f} / {encode[2]:.0f} s (float32 image layer: "
            f"{encode['float32']:.0f} s); version 1 served after {first_s:.0f} s")
        latents = store.read_latents(2)
        truth = exact_truth(latents, args.queries)
        built = {way: [] for way in ways}
        took, recall, kind, parts = {}, {}, {}, {}
        for r in range(args.rounds):
            for way in ways:
                holder = holder_after_version_1(path, ivf, kept_state, way)
                built[way].append(served_seconds(holder, 2, BUILD_THREADS))
                status = holder.status()
                took[way], kind[way] = status["build_way"], status["kind"]
                last = holder._builder.last  # where the build's seconds went
                parts[way] = {what: last[what + "_seconds"]
                              for what in ("centroid", "add", "calibration")}
                parts[way]["read_and_swap"] = built[way][-1] - last["seconds"]
                recall[way] = recall_at_10(holder._served.index, latents, truth)
                holder.close()
                log(f"round {r}: {way}: build+swap {built[way][-1]:.1f} s, built by "
                    f"{took[way]}, recall@10 {recall[way]:.3f}; seconds: " + ", ".join(
                        f"{what} {v:.1f}" for what, v in parts[way].items()))
        quiet = float("nan")
        during = {way: float("nan") for way in ways}
        timed = {way: 0 for way in ways}
        if args.step:  # the RAT step, quiet and during each way's build
            torch.set_num_threads(args.step_threads)
            torch.set_grad_enabled(True)  # load_net turned gradients off for the encoding
            step = make_rat_step(path)[0]
            _, _, i = step_ms(step, 0, 3)  # warm-up
            quiet, _, i = step_ms(step, i, 30)
            for way in ways:
                during[way], timed[way], i = step_ms(
                    step, i, holders=lambda way=way: holder_after_version_1(path, ivf, kept_state, way),
                    version=2, min_steps=args.min_steps)
            quiet_after, _, i = step_ms(step, i, 30)
            quiet = (quiet + quiet_after) / 2
            torch.set_num_threads(args.threads)
            torch.set_grad_enabled(False)
        row = {"n": n, "encode_s": encode[2], "encode_float32_s": encode["float32"],
               "first_build_s": first_s, "step_quiet_ms": quiet,
               **{f"{way}_{what}": value for way in ways for what, value in (
                   ("s", float(np.median(built[way]))), ("rounds", built[way]),
                   ("recall", recall[way]), ("took", took[way]), ("kind", kind[way]),
                   ("parts", parts[way]),
                   ("step_ms", during[way]), ("steps", timed[way]))}}
        print(row, file=sys.stderr, flush=True)
        rows_out.append(row)
        shutil.rmtree(path, ignore_errors=True)

    print(f"\nrefresh-to-served, version 2 of a deformed-MNIST store (encode at {args.threads} "
          f"torch threads; index builds in the service's build thread, FAISS at "
          f"{BUILD_THREADS} thread(s); step at {args.step_threads} thread(s); medians of "
          f"{args.rounds} alternating rounds)\n")
    print("| N | way (built by) | encode s | build+swap s | refresh-to-served s | recall@10 | "
          "index | step ms during build (x quiet; steps timed) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        for way in ways:
            print(f"| {r['n']:.0e} | {way} ({r[way + '_took']}) | {r['encode_s']:.1f} | "
                  f"{r[way + '_s']:.1f} | {r['encode_s'] + r[way + '_s']:.1f} | "
                  f"{r[way + '_recall']:.3f} | {r[way + '_kind']} | {r[way + '_step_ms']:.1f} "
                  f"({r[way + '_step_ms'] / r['step_quiet_ms']:.2f}; {r[way + '_steps']}) |")
        print(f"| {r['n']:.0e} | quiet step | | | | | | {r['step_quiet_ms']:.1f} |")
    print(f"\nencode s of version 2, image layer in float32 (before) / int8 (now; "
          f"{'this CPU has' if int8_dot_products() else 'no'} int8 dot products):")
    for r in rows_out:
        print(f"  N={r['n']:.0e}: {r['encode_float32_s']:.1f} / {r['encode_s']:.1f} s "
              f"({r['encode_float32_s'] / r['encode_s']:.2f}x)")


WAYS = ("kmeans", "assign", "lists")

if __name__ == "__main__":
    main()
