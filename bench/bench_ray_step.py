"""Where the Ray trainer's step time goes, beside the one-process trainer's: one process, one
1-rank gloo group, the same model, batches and subsets, interleaved rounds.

Variants (each a fresh model from the same seed, first refresh done before timing):
- one_process:    the one-process trainer's parts (train/local.py)
- ray_worker:     a Ray worker's parts as now: the exemplar cache in the worker, no DDP at a
                  world of one rank
- ray_actors_ddp: the Ray worker as it was before one-path (commit 68cb24d at this N): the
                  search answered by an index actor over all N (kind=flat), DDP around the
                  model even at a world of one
- ray_actors:     the same without DDP (the actor round trip alone)
- ray_worker_ddp: the cache in the worker with DDP (DDP alone)

Per step: reading the batch (store rows -> float), the prior sampler (query encoding, the
search, candidate assembly, the candidates' images) and the optimizer step (forward,
backward, update). Ratios are of CPU-time-free wall time in ms, medians over rounds.

    EXVAE_DATA_DIR=../shared/data python bench/bench_ray_step.py --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from exvae_dist import config as config_mod  # noqa: E402

VARIANTS = ("one_process", "ray_worker", "ray_actors_ddp", "ray_actors", "ray_worker_ddp")
PHASES = ("read", "sampler", "step")


def build(name: str, cfg, splits, store, handle):
    """The loop's parts of a variant, started (first latent version served)."""
    from torch.nn.parallel import DistributedDataParallel

    from exvae_dist.core import loop
    from exvae_dist.core.cache import ACTORS, WORKER
    from exvae_dist.core.group import Group
    from exvae_dist.train.local import build_parts as local_parts
    from exvae_dist.train.service_client import ShardedSearch
    from exvae_dist.train.worker import build_parts as worker_parts

    if name == "one_process":  # no index section there: its defaults
        d = config_mod.to_dict(cfg)
        d["index"] = config_mod.to_dict(config_mod.ExperimentConfig())["index"]
        parts = local_parts(config_mod.from_dict(d), splits)
    else:
        actors = name.startswith("ray_actors")
        parts = worker_parts(cfg, Path(cfg.train.run_dir) / name, store,
                             torch.from_numpy(splits.valid_x), splits.dynamic,
                             splits.image_shape,
                             ShardedSearch([handle], safety=cfg.prior.safety) if actors else None,
                             Group.current(), where=ACTORS if actors else WORKER)
        if name.endswith("_ddp"):
            parts.wrapped = DistributedDataParallel(parts.model)
    parts.sink = FreshStart()
    state, sampler, _ = loop.start(parts)
    return parts, state, sampler


class FreshStart:
    """A checkpoint sink outside a Ray Train session: nothing to resume, nothing saved."""

    def load(self):
        return None

    def save(self, state, improved, metrics):
        pass


def timed_steps(parts, state, sampler, batches, first: int, steps: int) -> dict:
    """ms per phase, summed over `steps` steps starting at batch `first`."""
    from exvae_dist.core.loop import binarize, seed_noise
    from exvae_dist.core.step import train_step

    out = dict.fromkeys(PHASES, 0.0)
    cfg = parts.cfg
    for i in range(first, first + steps):
        ids = batches[i % len(batches)]
        t0 = time.perf_counter()
        x = binarize(parts.train_images[ids].to(parts.device), parts.dynamic, cfg.train.seed,
                     state.step, 0)
        t1 = time.perf_counter()
        seed_noise(cfg.train.seed, state.step, 0)
        prior = sampler(parts.model, ids, x, state.step)
        t2 = time.perf_counter()
        train_step(parts.wrapped, state.optimizer, x, prior, 0.5, cfg.train.normalize_grads)
        t3 = time.perf_counter()
        state.step += 1
        for key, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
            out[key] += 1e3 * dt
    return {k: v / steps for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-train", type=int, default=None, help="first n MNIST training images")
    args = p.parse_args()

    import ray
    import torch.distributed as dist

    from exvae_dist.core.loop import EpochBatches
    from exvae_dist.data import load_dataset
    from exvae_dist.retrieval.exemplar_images import ensure_store
    from exvae_dist.retrieval.service import start_index_service
    from exvae_dist.train.driver import start_local_ray_without_dashboard

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_ray_step_"))
    overrides = [f"train.run_dir={root}", "tracking.enabled=false", "train.progress=false",
                 "index.kind=flat", "ray.resident_mb=512"]
    if args.n_train:
        overrides.append(f"data.n_train={args.n_train}")
    cfg = config_mod.load("mnist_vae_exemplar", overrides, env=os.environ)
    splits = load_dataset(cfg.data)
    store = ensure_store(root / "store.zarr", splits.train_x, splits.image_shape,
                         cfg.model.z_dim)
    start_local_ray_without_dashboard(2, log_to_driver=False)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=0, world_size=1)
    handle = start_index_service(str(store.path), cfg.index)
    try:
        built = {name: build(name, cfg, splits, store, handle) for name in VARIANTS}
        batches = EpochBatches(len(splits.train_x), cfg.train.batch_size, cfg.train.seed, 0)
        for parts, state, sampler in built.values():  # warm-up: caches, allocator, threads
            timed_steps(parts, state, sampler, batches, 0, 3)
        samples = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            for name in VARIANTS:  # alternate the variants within every round
                parts, state, sampler = built[name]
                samples[name].append(timed_steps(parts, state, sampler, batches,
                                                 3 + r * args.steps, args.steps))
    finally:
        dist.destroy_process_group()
        ray.shutdown()
    med = {n: {k: statistics.median(s[k] for s in samples[n]) for k in PHASES}
           for n in VARIANTS}
    base = sum(med["one_process"].values())
    print(f"\nms per step, median of {args.rounds} rounds of {args.steps} steps "
          f"({args.threads} threads, N = {len(splits.train_x)})\n")
    print("| variant | read | sampler | optimizer step | total | / one-process |")
    print("|---|---|---|---|---|---|")
    for n in VARIANTS:
        total = sum(med[n].values())
        print(f"| {n} | {med[n]['read']:.1f} | {med[n]['sampler']:.1f} | "
              f"{med[n]['step']:.1f} | {total:.1f} | {total / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
