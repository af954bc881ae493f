"""How the store-backed data path scales with N: build, RAT-step reads, memory, refresh.

    python bench/bench_scale.py --sizes 1e5,1e6,1e7 [--source tiled|deformed] [--workdir DIR]

Per N, in fresh processes (so each peak RSS is its own):
1. build: the store is ingested (exvae_dist.commands.ingest.ingest) from `deformed` (deformed MNIST,
   the real generator) or `tiled` (MNIST digit i mod 50,000: the same bytes per row, no
   deformation cost, so the build time is the store's own write cost). Seconds, GB on disk.
2. steps: a RAT step as a worker runs it, minus the index query (bench_index.py): the batch
   of 100 from the keyed epoch order, a [100, k'=40] neighbour ranking of random ids
   (retrieved ids are scattered over the store, the worst case for locality), keyed coins
   and assemble_candidates (k=10), the batch and candidate rows read by id through
   StoreImages (the data path), then train_step of the paper's MLP VAE (1 torch thread).
   Median ms over the steps (whole step, and its data path), and the same step's coins done
   the old way (draw_coins: an [N] vector). Peak RSS of this process after the steps.
3. refresh: the paper's MLP encoder (1 torch thread) streams every row from the store in
   chunk-sized blocks and writes a latent version (bounded memory). Seconds, peak RSS.
Ratios are against the first size of the same run. The store is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def du_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def phase_build(n: int, store: Path, source_kind: str) -> dict:
    from exvae_dist.data import ingest as ingest_mod
    from exvae_dist.data.deformed import deformed_rows  # noqa: F401

    class Tiled(ingest_mod.DeformedMnistSource):
        def read(self, rows):
            return self.base[rows % len(self.base)][:, None], self.base_labels[
                rows % len(self.base)].astype(np.int64)

    cls = Tiled if source_kind == "tiled" else ingest_mod.DeformedMnistSource
    source = cls(n, seed=0, data_root=os.environ.get("EXVAE_DATA_DIR"))
    t = time.perf_counter()
    ingest_mod.ingest(source, store, progress=sys.stderr.isatty())
    return {"build_s": time.perf_counter() - t, "disk_gb": du_gb(store),
            "build_rss_mb": rss_mb()}


def rat_batch(images, batch_ids: np.ndarray, neighbours: np.ndarray, step: int, n: int, m: int,
              k: int):
    """A RAT step's inputs as a worker assembles them from the step's retrieved `neighbours`
    [B, k'] (the subset's coins, leave-one-out, the k kept per example): (binarized batch x,
    its PriorBatch). `images[ids]` -> float32 rows (a tensor, or StoreImages read by id).
    bench_ddp's step uses it too."""
    import torch

    from exvae_dist.core import keyed
    from exvae_dist.core.candidates import assemble_candidates
    from exvae_dist.core.step import PriorBatch
    cand = assemble_candidates(
        neighbours, batch_ids, lambda ids: keyed.coins_for(ids, step, m, n, 0), k, n, m)
    return torch.bernoulli(images[batch_ids]), PriorBatch(
        exemplars=images[cand.ids], exclude=torch.from_numpy(cand.exclude),
        log_norm=torch.from_numpy(cand.log_norm).float(), n_candidates=len(cand.ids))


def make_rat_step(store_path: Path):
    """A worker's RAT step minus the index query, on the store at store_path (module
    docstring, 2.). Returns (step(i) -> (data-path seconds, rows read), neighbours(i) -> the
    step's [B, k'] random neighbour ids, n, m, k, B)."""
    import torch

    from exvae_dist import config as config_mod
    from exvae_dist.core.loop import make_optimizer
    from exvae_dist.core.objective import build_model
    from exvae_dist.core import keyed
    from exvae_dist.retrieval.store import ExemplarStore
    from exvae_dist.core.step import train_step
    from exvae_dist.train.store_images import StoreImages
    torch.manual_seed(0)
    store = ExemplarStore(store_path)
    images = StoreImages(store, cache_bytes=0)  # read by id: what a worker does at scale
    n = len(images)
    m, k, depth, b = n // 2, 10, 40, 100
    # the paper's MLP VAE (gated 784-300-300, z = 40) and Adam, as a worker trains it
    model = build_model(config_mod.load(None, [], env={}), tuple(store.image_shape))
    optimizer = make_optimizer(model, config_mod.load(None, [], env={}))

    def neighbours(i: int) -> np.ndarray:
        return np.random.default_rng(i).integers(0, n, (b, depth))

    def step(i: int) -> tuple[float, int]:
        t = time.perf_counter()
        x, prior = rat_batch(images, keyed.epoch_batch_ids(n, 0, 0, i * b, i * b + b),
                             neighbours(i), i, n, m, k)
        t_data = time.perf_counter() - t
        train_step(model, optimizer, x, prior, 1.0)
        return t_data, len(x) + len(prior.exemplars)

    return step, neighbours, n, m, k, b


def phase_steps(store_path: Path, steps: int) -> dict:
    import torch

    from exvae_dist.core import keyed
    from exvae_dist.core.candidates import assemble_candidates, draw_coins
    torch.set_num_threads(1)
    step, neighbours, n, m, k, b = make_rat_step(store_path)
    times, data_times, rows = [], [], []
    for i in range(steps + 3):  # 3 warm-up steps
        t = time.perf_counter()
        t_data, n_rows = step(i)
        if i >= 3:
            times.append(time.perf_counter() - t)
            data_times.append(t_data)
            rows.append(n_rows)
    step_rss = rss_mb()  # before the old path's [N] coin vectors below raise the peak
    rng = np.random.default_rng(1)
    old_coin_times = []
    for i in range(steps):
        batch_ids = keyed.epoch_batch_ids(n, 0, 0, i * b, i * b + b)
        t = time.perf_counter()
        assemble_candidates(neighbours(i), batch_ids, draw_coins(n, m, rng), k)
        old_coin_times.append(time.perf_counter() - t)
    return {"step_ms": 1000 * statistics.median(times),
            "data_ms": 1000 * statistics.median(data_times),
            "old_coins_ms": 1000 * statistics.median(old_coin_times),
            "rows_per_step": statistics.median(rows), "step_rss_mb": step_rss}


def phase_refresh(store_path: Path) -> dict:
    import torch

    from exvae_dist import config as config_mod
    from exvae_dist.core.objective import build_model
    from exvae_dist.retrieval.store import ExemplarStore
    from exvae_dist.train.refresh import encode_into_version
    from exvae_dist.train.store_images import StoreImages
    torch.set_num_threads(1)
    torch.manual_seed(0)
    store = ExemplarStore(store_path)
    images = StoreImages(store, cache_bytes=0)
    net = build_model(config_mod.load(None, [], env={}), tuple(store.image_shape)).net
    t = time.perf_counter()
    version = store.claim_version()  # above any version a training run left in the store
    encode_into_version(store, version, net, images, 0, store.n)
    store.mark_complete(version)
    return {"refresh_s": time.perf_counter() - t, "refresh_rss_mb": rss_mb()}


def child(args) -> None:
    store = Path(args.store)
    if args.phase == "build":
        out = phase_build(args.n, store, args.source)
    elif args.phase == "steps":
        out = phase_steps(store, args.steps)
    else:
        out = phase_refresh(store)
    print("RESULT " + json.dumps(out), flush=True)


def run_phase(phase: str, n: int, store: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--n", str(n), "--store", str(store),
           "--source", args.source, "--steps", str(args.steps)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ,
                          "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{phase} at N={n} failed (exit {proc.returncode})")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e5,1e6")
    ap.add_argument("--source", choices=("tiled", "deformed"), default="tiled")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--workdir", default=None, help="where the stores go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--reuse", default="", help="comma-separated N=PATH: an existing store of N "
                    "rows (e.g. an ingested deformed-mnist:1e7) is used instead of building one "
                    "(no build figures for that N); it is never deleted")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        return child(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    reuse = {int(float(k)): Path(v) for k, v in
             (item.split("=", 1) for item in args.reuse.split(",") if item)}
    rows = []
    for n in (int(float(s)) for s in args.sizes.split(",")):
        store = reuse.get(n, work / f"store_{n}")
        r = {"n": n, "build_s": float("nan"), "disk_gb": du_gb(store) if n in reuse else 0}
        phases = ("steps", "refresh") if n in reuse else ("build", "steps", "refresh")
        if n not in reuse:
            shutil.rmtree(store, ignore_errors=True)
        for phase in phases:
            r.update(run_phase(phase, n, store, args))
            print(f"N={n} {phase}: {json.dumps(r)}", file=sys.stderr, flush=True)
        rows.append(r)
        if not args.keep and n not in reuse:
            shutil.rmtree(store, ignore_errors=True)
    base = rows[0]
    print(f"\nsource={args.source}, {args.steps} steps, B=100, k'=40, k=10, M=N/2")
    print("| N | build s | GB on disk | RAT step ms (median) | x | data path ms | x | "
          "rows read/step | old [N]-coin assembly ms | step-process peak RSS MB | x | "
          "refresh s | x | refresh peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:.0e} | {r['build_s']:.1f} | {r['disk_gb']:.2f} | {r['step_ms']:.1f} | "
              f"{r['step_ms'] / base['step_ms']:.2f} | {r['data_ms']:.1f} | "
              f"{r['data_ms'] / base['data_ms']:.2f} | {r['rows_per_step']:.0f} | "
              f"{r['old_coins_ms']:.1f} | {r['step_rss_mb']:.0f} | "
              f"{r['step_rss_mb'] / base['step_rss_mb']:.2f} | {r['refresh_s']:.1f} | "
              f"{r['refresh_s'] / base['refresh_s']:.1f} | {r['refresh_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
