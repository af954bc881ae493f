"""Where the 2-worker shortfall comes from, without Ray: the RAT training step of the paper's
MNIST VAE in 1 process x 2 torch threads (batch 100) against 2 processes x 1 thread (batch 50
each: the Ray trainer's split at 2 workers x 1 CPU), with five gradient exchanges: DDP over
gloo's all-reduce; DDP averaging through shared memory, as the Ray trainer now runs it on one
machine (core/shared_grads.py, a comm hook); DDP with every gradient in one bucket; DDP
sending float16 gradients (its fp16 comm hook); one flat gloo all-reduce of all gradients
after backward, from an optimizer pre-step hook (after train_step has normalised each rank's
gradients, core/step.py, where DDP averages before: the same work per step, not the same
update) -- and with none (the ideal of two independent halves). Variants alternate over
--rounds; medians of examples/s. bench/README.md, "Two workers x 1 CPU".

    EXVAE_DATA_DIR=../shared/data python bench/bench_ddp.py --steps 80 --rounds 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

K, DEPTH = 10, 40  # retrieved neighbours kept per example, searched depth


def exchange(model, optimizer, how: str, world: int):
    """The model as the step sees it, with its gradients exchanged the way `how` says."""
    import torch
    import torch.distributed as dist

    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if how == "ddp fp16":  # gradients sent as float16 (halves the bytes; rounds them)
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(dist.group.WORLD, default_hooks.fp16_compress_hook)
        return ddp
    if how == "ddp one bucket":
        return torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=64,
                                                         gradient_as_bucket_view=True)
    if how == "flat":
        params = [p for p in model.parameters() if p.requires_grad]

        def average(*_):
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p.grad))

        optimizer.register_step_pre_hook(average)
    if how == "shm":  # adopted: what the Ray trainer runs on one machine (train/worker.wrap)
        from exvae_dist.core.group import Group
        from exvae_dist.train.worker import wrap

        net = wrap(model, Group.current(), torch.device("cpu"))
        assert net._comm_hooks, "the shared-memory hook was not registered"
        return net
    return model


def run_steps(rank: int, world: int, threads: int, batch: int, steps: int, how: str,
              out: dict) -> None:
    import torch
    import torch.distributed as dist

    from exvae_dist import config as config_mod
    from exvae_dist.core import keyed
    from exvae_dist.core.loop import make_optimizer
    from exvae_dist.core.objective import build_model
    from exvae_dist.core.step import train_step
    from exvae_dist.data import load_dataset
    sys.path.insert(0, str(REPO / "bench"))
    from bench_scale import rat_batch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = config_mod.load("mnist_vae_exemplar", [], env=dict(os.environ))
    images = torch.from_numpy(load_dataset(cfg.data).train_x)
    n = images.shape[0]
    m = n // 2
    model = build_model(cfg, (784,))
    optimizer = make_optimizer(model, cfg)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("BENCH_PORT", "29533"))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    net = exchange(model, optimizer, how, world)
    times = []
    for step in range(steps + 3):
        if world > 1:
            dist.barrier()
        t = time.perf_counter()
        lo = step * batch * world + rank * batch
        ids = keyed.epoch_batch_ids(n, 0, 0, lo, lo + batch)
        nbrs = np.random.default_rng(step * world + rank).integers(0, n, (batch, DEPTH))
        train_step(net, optimizer, *rat_batch(images, ids, nbrs, step, n, m, K), 1.0)
        if step >= 3:
            times.append(time.perf_counter() - t)
    ms = torch.tensor([1000 * statistics.median(times)])
    if world > 1:
        # A tensor all-reduce, not all_gather_object, and DDP dropped before the group: gloo's
        # worker thread, freeing an object all-gather's Python buffers, waits for the GIL
        # that the group's destructor holds while it joins that thread (the old hang).
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        del net
        dist.destroy_process_group()
    out["ms"] = float(ms)


def _child(rank, world, threads, batch, steps, how, port, queue):
    os.environ["BENCH_PORT"] = str(port)
    out = {}
    run_steps(rank, world, threads, batch, steps, how, out)
    if rank == 0:
        queue.put(out["ms"])


def measure(world: int, threads: int, batch: int, steps: int, how: str,
            port: int) -> float:
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(r, world, threads, batch, steps, how, port,
                                              queue)) for r in range(world)]
    for p in procs:
        p.start()
    ms = queue.get(timeout=600)
    for p in procs:  # its figure is in; a child stuck in its exit is not waited for
        p.join(30)
        if p.is_alive():
            p.terminate()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated exchanges to run beside the "
                    "1 x 2 baseline: ddp, shm, 'ddp one bucket', 'ddp fp16', flat, none")
    args = ap.parse_args()
    variants = {"1 process x 2 threads, batch 100": (1, 2, 100, ""),
                "2 x 1 thread, batch 50 each, DDP (gloo)": (2, 1, 50, "ddp"),
                "2 x 1 thread, DDP averaging through shared memory (the Ray trainer)":
                    (2, 1, 50, "shm"),
                "2 x 1 thread, DDP, one bucket": (2, 1, 50, "ddp one bucket"),
                "2 x 1 thread, DDP, float16 gradients": (2, 1, 50, "ddp fp16"),
                "2 x 1 thread, one flat all-reduce after backward": (2, 1, 50, "flat"),
                "2 x 1 thread, no gradient exchange": (2, 1, 50, "none")}
    if args.only:
        keep = set(args.only.split(","))
        variants = {name: v for name, v in variants.items() if v[3] in keep or v[0] == 1}
    got = {name: [] for name in variants}
    port = 29533
    for r in range(args.rounds):
        for name, (world, threads, batch, how) in variants.items():
            port += 1  # a fresh port each time: the last one may still be in TIME_WAIT
            ms = measure(world, threads, batch, args.steps, how, port)
            got[name].append(100 / ms * 1000)  # examples/s of the global batch of 100
            print(f"round {r}: {name}: {ms:.1f} ms/step", file=sys.stderr, flush=True)
    base = statistics.median(got["1 process x 2 threads, batch 100"])
    print("\n| variant | examples/s (median) | x 1 process x 2 threads | rounds |")
    print("|---|---|---|---|")
    for name, vals in got.items():
        med = statistics.median(vals)
        print(f"| {name} | {med:.0f} | {med / base:.2f} | {', '.join(f'{v:.0f}' for v in vals)} |")


if __name__ == "__main__":
    main()
