"""Seconds per training step on MNIST with the paper's MLP VAE and batch 100: Gaussian prior
(the baseline), exact exemplar prior (M = 25,000) and RAT (k = 10), in one run.

    EXVAE_DATA_DIR=../shared/data python bench/bench_step.py [--steps 30] [--exact-steps 5]

Prints a table of mean step times and their ratios to the Gaussian step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from exvae_dist import config as config_mod
from exvae_dist.data import load_dataset
from exvae_dist.objective import build_model
from exvae_dist.step import PriorSampler, TorchExactSearch, exemplar_centres, train_step
from exvae_dist.trainer import batch_images, make_optimizer


def time_steps(cfg, splits, steps: int, warmup: int = 3) -> tuple[float, dict]:
    torch.manual_seed(0)
    train_x = torch.from_numpy(splits.train_x)
    model = build_model(cfg, splits.image_shape)
    opt = make_optimizer(model, cfg)
    search = TorchExactSearch()
    sampler = PriorSampler(cfg.prior, train_x, search, seed=1)
    if cfg.prior.kind == "exemplar" and cfg.prior.rat:
        search.update(exemplar_centres(model, train_x))
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    times, cands = [], []
    for i in range(warmup + steps):
        ids = rng.choice(train_x.shape[0], cfg.train.batch_size, replace=False)
        t0 = time.perf_counter()
        x = batch_images(train_x, ids, True, gen)
        m = train_step(model, opt, x, sampler(model, ids, x), 1.0)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cands.append(m["candidates"])
    return statistics.mean(times), {"candidates": statistics.mean(cands)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--exact-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = config_mod.load(None, [], env=os.environ)
    splits = load_dataset(base.data)
    rows = []
    for label, overrides, steps in [
        ("gaussian prior", ["prior.kind=gaussian"], args.steps),
        ("exact exemplar prior (M=25,000)", ["prior.kind=exemplar", "prior.rat=false"], args.exact_steps),
        ("RAT (k=10)", ["prior.kind=exemplar", "prior.rat=true"], args.steps),
    ]:
        cfg = config_mod.load(None, overrides, env=os.environ)
        seconds, extra = time_steps(cfg, splits, steps)
        rows.append((label, seconds, extra["candidates"]))
    base_s = rows[0][1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 100, MNIST 50,000")
    print(f"| step | ms per step | x Gaussian | exemplars encoded |")
    print(f"|---|---|---|---|")
    for label, s, c in rows:
        print(f"| {label} | {s * 1e3:.1f} | {s / base_s:.2f} | {c:.0f} |")


if __name__ == "__main__":
    main()
