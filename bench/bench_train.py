"""Distributed training benchmark: the Ray trainer against the one-process trainer.

Same data, model and settings for every variant (MNIST, the paper's MLP VAE, RAT k=10,
M = N/2, batch 100); each trains `--epochs` epochs and the LAST epoch is reported (the first
one pays for start-up and warm caches). Measured in one run, printed as ratios:

1. one-process trainer (2 torch threads) vs Ray, 1 worker with 2 CPUs (2 threads): examples/s
   and the one-process trainer beside as many idle Ray actors as Ray Train starts (what
   those processes cost a trainer that wants every core)
2. Ray, 1 worker (2 CPUs) vs Ray, 2 workers (1 CPU each): examples/s
3. wall time of one MNIST RAT epoch (train + refresh + validation) for each variant
4. step time while the index service rebuilds vs not (Ray, IVF-PQ index so that a rebuild
   takes seconds, a refresh every `--refresh-every` steps)

    EXVAE_DATA_DIR=../shared/data python bench/bench_train.py --epochs 2

TorchTrainer start-up (~12 s here) is excluded: times come from the runs' metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from exvae_dist import config as config_mod  # noqa: E402


def last_epoch(run: Path) -> dict:
    """The last epoch, with every epoch's figures attached. Not the fastest: a fresh encoder
    maps exemplars close together and retrieves fewer unique candidates, so the first epoch
    is systematically cheaper than the ones after it."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if "val_elbo" in r]
    best = dict(epochs[-1])
    best["all_epochs"] = [{k: r.get(k) for k in ("epoch", "examples_per_second", "train_seconds",
                                                 "epoch_seconds", "step_ms_during_rebuild",
                                                 "steps_during_rebuild", "step_ms_steady",
                                                 "train_thread_cpu_share")}
                          for r in epochs]
    return best


# name, Ray workers (0 = the one-process trainer), CPUs per worker, torch threads, overrides
VARIANTS = [
    ("one_process", 0, 0, 2, []),
    # the one-process trainer beside idle Ray actors, as many as Ray Train starts for a local
    # run beside its workers (controller, placement-group cleaner, synchronization actor,
    # dataset manager, autoscaling coordinator; start_local_ray turns its preemption watcher
    # off): what those processes alone cost a trainer that wants every core (each Ray Python
    # process wakes every 10 ms)
    ("one_process_beside_idle_actors", 0, 0, 2, []),
    ("ray_1w", 1, 2, 2, []),
    ("ray_2w", 2, 1, 1, []),
    ("one_process_1t", 0, 0, 1, []),
    ("ray_1w_1t", 1, 1, 1, []),
    # an IVF takes seconds to rebuild, so steps overlap rebuilds (below auto_exact_below the
    # workers search their own copy of the 50,000 means: no index actor to rebuild)
    ("rebuild", 1, 2, 2, ["index.auto_exact_below=0", "prior.refresh_every={refresh_every}"]),
    ("rebuild_1t", 1, 1, 1, ["index.auto_exact_below=0",
                             "prior.refresh_every={refresh_every}"]),
]


IDLE_ACTORS = 5  # Ray Train's own actors in a local run, beside its workers (ps)


def variant(base: list[str], root: Path, name: str, *extra: str):
    return config_mod.load("mnist_vae", [*base, f"train.run_dir={root}", f"train.name={name}",
                                         *extra], env=os.environ)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-train", type=int, default=None, help="first n training images (all)")
    p.add_argument("--refresh-every", type=int, default=50)
    p.add_argument("--skip", default="", help="comma list of variants to skip")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the variant list this many times, alternating the variants "
                        "(A B C A B C); each figure is the median over the rounds")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "bench_train.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from exvae_dist.train.local import fit
    from exvae_dist.train.driver import run, start_local_ray_without_dashboard

    @ray.remote(num_cpus=0)
    class IdleActor:
        def pid(self) -> int:
            return os.getpid()

    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    base = [f"train.epochs={args.epochs}", "train.warmup_epochs=100", "train.progress=false",
            "tracking.enabled=false", "train.log_every=100"]
    if args.n_train:
        base.append(f"data.n_train={args.n_train}")
    skip = set(args.skip.split(",")) - {""}
    results: dict[str, dict] = {}
    t_all = time.perf_counter()
    start_local_ray_without_dashboard(2, log_to_driver=False)
    try:
        rounds: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            for name, ray_workers, cpus, threads, extra in VARIANTS:
                if name in skip:
                    continue
                extra = [e.format(refresh_every=args.refresh_every) for e in extra]
                cfg = variant(base, root, f"{name}_r{r}", f"train.threads={threads}", *extra,
                              *([f"ray.num_workers={ray_workers}", f"ray.cpus_per_worker={cpus}"]
                                if ray_workers else []))
                idle = [IdleActor.remote() for _ in range(IDLE_ACTORS
                                                          if "idle_actors" in name else 0)]
                ray.get([actor.pid.remote() for actor in idle])  # started before the run
                if ray_workers:
                    run(cfg)
                else:
                    fit(cfg)
                for actor in idle:
                    ray.kill(actor)
                rounds.setdefault(name, []).append(last_epoch(cfg.run_path()))
        for name, recs in rounds.items():  # the round with the median examples/s
            recs = sorted(recs, key=lambda rec: rec["examples_per_second"])
            results[name] = recs[len(recs) // 2]
            results[name]["rounds_examples_per_second"] = [
                rec["examples_per_second"] for rec in rounds[name]]
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nMNIST RAT, {args.epochs} epochs per variant, last epoch reported, median of "
          f"{args.rounds} alternating round(s) (total bench time "
          f"{time.perf_counter() - t_all:.0f} s)\n")
    # thread CPU share: the share of the train span the (rank 0) training thread was on a
    # CPU; below ~0.95 it waited (a busy core, the other rank), which the wall time alone hides
    print("| variant | epoch | examples/s (train) | train s/epoch | epoch s (train+refresh+"
          "validation) | val ELBO | every round: examples/s | thread CPU share |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        every = ", ".join(f"{e:.0f}" for e in r["rounds_examples_per_second"])
        print(f"| {name} | {r['epoch']} | {r['examples_per_second']:.0f} | "
              f"{r['train_seconds']:.1f} | {r['epoch_seconds']:.1f} | {r['val_elbo']:.2f} | "
              f"{every} | {r.get('train_thread_cpu_share', float('nan')):.3f} |")
    ratios = {}
    for a, b in (("ray_1w", "one_process"), ("one_process_beside_idle_actors", "one_process"),
                 ("ray_2w", "ray_1w"),
                 ("ray_1w_1t", "one_process_1t")):
        if a in results and b in results:
            ratios[f"{a} / {b} examples/s"] = (results[a]["examples_per_second"]
                                               / results[b]["examples_per_second"])
            each = [x / y for x, y in zip(results[a]["rounds_examples_per_second"],
                                          results[b]["rounds_examples_per_second"])]
            print(f"{a} / {b}, round by round: " + ", ".join(f"{e:.2f}" for e in each))
    for name in ("rebuild", "rebuild_1t"):
        if name not in results:
            continue
        r = results[name]
        nan = float("nan")  # metrics.jsonl writes a missing figure as null
        print(f"\n{name}: step during an index rebuild "
              f"{r.get('step_ms_during_rebuild') or nan:.1f} ms over "
              f"{r.get('steps_during_rebuild') or 0:.0f} steps; other steps "
              f"{r.get('step_ms_steady') or nan:.1f} ms")
        if r.get("steps_during_rebuild"):
            ratios[f"{name}: step during rebuild / steady"] = (r["step_ms_during_rebuild"]
                                                               / r["step_ms_steady"])
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "ratios": ratios},
                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
