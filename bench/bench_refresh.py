"""Refresh-to-served at N exemplars: encode a new latent version, build its index, swap it in.

Per N, one deformed-MNIST store (data/ingest's DeformedMnistSource, built in the run) and
two consecutive weights of a trained encoder (--before / --after: checkpoints one epoch
apart, so the latents move as much as they do between two refreshes). Version 1 is encoded
with --before and served; version 2 with --after. Then version 2's index is built both ways,
alternating over --rounds, each by an IndexHolder (the index service's own code, its one
build thread) that already serves version 1:

- scratch: a fresh holder, whose builder has no centroids yet: version 2 runs the k-means,
  as every version did before issue 31;
- kept:    the holder that built version 1, reusing its centroids (IndexBuilder).

Printed per N: encode s (torch threads --threads), build s and refresh-to-served s (refresh
call -> the new version answers; the swap is one reference assignment) for both, recall@10
of version 2's index on --queries of its own rows against exact search (FAISS knn, own row
left out, as RAT leaves it out), and which builds kept their centroids.

Step during a rebuild: bench_scale's RAT step (a worker's step minus the index query: batch
and candidate rows read by id from the store, train_step of the paper's MLP VAE) at
--step-threads torch threads, timed while nothing builds (quiet) and while the holder builds
version 2 in its thread, both ways; medians, and their ratio to quiet. The build runs with
index.service_threads FAISS threads (2 as shipped), sharing the cores with the step.

    EXVAE_DATA_DIR=../shared/data python bench/bench_refresh.py --sizes 1e5,1e6 \\
        --before /tmp/fast_ckpts/epoch_a.pt --after /tmp/fast_ckpts/epoch_b.pt
    # 1e7: one round, no step timing (the store alone takes ~28 min to make here)
    EXVAE_DATA_DIR=../shared/data python bench/bench_refresh.py --sizes 1e7 --rounds 1 \\
        --no-step --before /tmp/fast_ckpts/epoch_a.pt --after /tmp/fast_ckpts/epoch_b.pt
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


def recall_at_10(index, latents: np.ndarray, queries: int, seed: int = 0) -> float:
    import faiss

    rows = np.sort(np.random.default_rng(seed).choice(len(latents), queries, replace=False))
    q = latents[rows]
    _, truth = faiss.knn(q, latents, 11)
    _, found = index.search(q, 11)
    hits = []
    for r, f, t in zip(rows, found, truth):
        f, t = [i for i in f if i != r][:10], [i for i in t if i != r][:10]
        hits.append(len(set(f) & set(t)) / 10)
    return float(np.mean(hits))


def step_ms(step, first: int, count: int = 0, holder=None, version: int = 0) -> tuple[float, int]:
    """Median ms of RAT steps: `count` of them, or (holder given) as many as fit while the
    holder builds `version`. Returns (median ms, steps timed, next step number)."""
    times, i = [], first
    if holder is not None:
        holder.refresh(version)
    while (len(times) < count) if holder is None else (holder.status()["version"] or 0) < version:
        t = time.perf_counter()
        step(i)
        times.append(1000 * (time.perf_counter() - t))
        i += 1
    return (float(np.median(times)) if times else float("nan")), len(times), i


def served_seconds(holder, version: int) -> float:
    t = time.perf_counter()
    holder.refresh(version)
    holder.wait_for_version(version, timeout=3600)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e5,1e6")
    ap.add_argument("--before", required=True, help="checkpoint of the encoder for version 1")
    ap.add_argument("--after", required=True, help="the next epoch's checkpoint (version 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the encoding")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--step-threads", type=int, default=1,
                    help="torch threads of the RAT step timed during a rebuild")
    ap.add_argument("--no-step", dest="step", action="store_false",
                    help="skip the step timing (at 1e7 it costs two more builds)")
    args = ap.parse_args()

    import torch

    from exvae_dist.config import IndexConfig
    from exvae_dist.data import ingest as ingest_mod
    from exvae_dist.retrieval.service import IndexHolder
    from exvae_dist.retrieval.store import ExemplarStore
    from exvae_dist.train.refresh import encode_into_version
    from exvae_dist.train.store_images import StoreImages
    sys.path.insert(0, str(REPO / "bench"))
    from bench_scale import make_rat_step

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_refresh_"))
    cfg = IndexConfig()  # kind=auto as shipped
    rows_out = []
    for n in (int(float(s)) for s in args.sizes.split(",")):
        path = work / f"deformed_{n}"
        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        source = ingest_mod.DeformedMnistSource(n, seed=0, data_root=os.environ.get("EXVAE_DATA_DIR"))
        ingest_mod.ingest(source, path, progress=False)
        print(f"N={n}: store built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        store = ExemplarStore(path)
        images = StoreImages(store, cache_bytes=0)
        encode = {}
        for version, ckpt in ((1, args.before), (2, args.after)):
            net = load_net(ckpt, store.image_shape)
            store.claim_version()
            t = time.perf_counter()
            encode_into_version(store, version, net, images, 0, store.n)
            store.mark_complete(version)
            encode[version] = time.perf_counter() - t
        # a kind=auto IVF at every N here (below auto_exact_below the cache is in the workers)
        ivf = dataclasses.replace(cfg, auto_exact_below=0)
        kept = IndexHolder(str(path), ivf, load_latest=False)
        first = served_seconds(kept, 1)
        built = {"scratch": [], "kept": []}
        status = {}
        def log(what):
            print(f"N={n}: {what} ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)

        log(f"encode {encode[1]:.0f} / {encode[2]:.0f} s; version 1 served after {first:.0f} s")
        for r in range(args.rounds):
            # a fresh holder has no centroids to keep: version 2 runs the k-means
            scratch = IndexHolder(str(path), ivf, load_latest=False)
            built["scratch"].append(served_seconds(scratch, 2))
            log(f"round {r}: k-means build+swap {built['scratch'][-1]:.0f} s")
            status["scratch"] = scratch.status()
            latents = store.read_latents(2)
            recall_scratch = recall_at_10(scratch._served.index, latents, args.queries)
            scratch.close()
            built["kept"].append(served_seconds(kept, 2))
            log(f"round {r}: kept-centroids build+swap {built['kept'][-1]:.0f} s")
            status["kept"] = kept.status()
            recall_kept = recall_at_10(kept._served.index, latents, args.queries)
            # back to version 1's centroids for the next round: a fresh holder rebuilds 1
            kept.close()
            if r < args.rounds - 1 or args.step:
                kept = IndexHolder(str(path), ivf, load_latest=False)
                served_seconds(kept, 1)
        quiet = quiet_after = during_kept = during_scratch = float("nan")
        n_quiet = n_kept = n_scratch = 0
        if args.step:  # the RAT step, quiet and during each kind of build (kept: at version 1)
            torch.set_num_threads(args.step_threads)
            torch.set_grad_enabled(True)  # load_net turned gradients off for the encoding
            step = make_rat_step(path)[0]
            _, _, i = step_ms(step, 0, 3)  # warm-up
            quiet, n_quiet, i = step_ms(step, i, 30)
            during_kept, n_kept, i = step_ms(step, i, holder=kept, version=2)
            scratch = IndexHolder(str(path), ivf, load_latest=False)  # no centroids: k-means
            during_scratch, n_scratch, i = step_ms(step, i, holder=scratch, version=2)
            quiet_after, _, i = step_ms(step, i, 30)
            scratch.close()
            torch.set_num_threads(args.threads)
            torch.set_grad_enabled(False)
            kept.close()
        row = {"n": n, "encode_s": encode[2], "first_build_s": first,
               "step_quiet_ms": (quiet + quiet_after) / 2, "step_during_kept_ms": during_kept,
               "step_during_scratch_ms": during_scratch, "steps_timed": [n_quiet, n_kept, n_scratch],
               "scratch_s": float(np.median(built["scratch"])),
               "kept_s": float(np.median(built["kept"])),
               "scratch_rounds": built["scratch"], "kept_rounds": built["kept"],
               "recall_scratch": recall_scratch, "recall_kept": recall_kept,
               "kept_kind": status["kept"]["kind"], "scratch_kind": status["scratch"]["kind"],
               "kept_centroids": status["kept"]["kept_centroids"]}
        print(row, file=sys.stderr, flush=True)
        rows_out.append(row)
        shutil.rmtree(path, ignore_errors=True)

    print(f"\nrefresh-to-served, version 2 of a deformed-MNIST store (encode at {args.threads} "
          f"torch threads; index builds in the service's build thread, FAISS at "
          f"index.service_threads={cfg.service_threads}; step at {args.step_threads} thread(s); medians of "
          f"{args.rounds} alternating rounds)\n")
    print("| N | encode s | build+swap s, k-means each version | build+swap s, kept centroids | "
          "refresh-to-served s, before / after | recall@10 before / after | after: index | "
          "step ms quiet | step during build, before / after (x quiet) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['n']:.0e} | {r['encode_s']:.1f} | {r['scratch_s']:.1f} | {r['kept_s']:.1f} "
              f"| {r['encode_s'] + r['scratch_s']:.1f} / {r['encode_s'] + r['kept_s']:.1f} | "
              f"{r['recall_scratch']:.3f} / {r['recall_kept']:.3f} | {r['kept_kind']}"
              f"{' (kept)' if r['kept_centroids'] else ' (trained again)'} | "
              f"{r['step_quiet_ms']:.1f} | {r['step_during_scratch_ms']:.1f} "
              f"({r['step_during_scratch_ms'] / r['step_quiet_ms']:.2f}) / "
              f"{r['step_during_kept_ms']:.1f} ({r['step_during_kept_ms'] / r['step_quiet_ms']:.2f}) |")


if __name__ == "__main__":
    main()
