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
from exvae_dist.loop import binarize, make_optimizer
from exvae_dist.retrieval.exact import TorchExactSearch
from exvae_dist.step import PriorSampler, exemplar_centres, train_step


def pretrained_net_state(cfg, splits, steps: int) -> dict:
    """A RAT model trained for `steps` steps, so neighbour sets look like a real run's (a
    fresh encoder maps everything close together and retrieves far fewer unique exemplars)."""
    torch.manual_seed(0)
    train_x = torch.from_numpy(splits.train_x)
    model = build_model(cfg, splits.image_shape)
    opt = make_optimizer(model, cfg)
    search = TorchExactSearch()
    sampler = PriorSampler(cfg.prior, train_x, search, seed=1)
    rng = np.random.default_rng(1)
    for i in range(steps):
        if i % 100 == 0:
            search.update(exemplar_centres(model, train_x))
        ids = rng.choice(train_x.shape[0], cfg.train.batch_size, replace=False)
        x = binarize(train_x[ids], True, 1, i, 0)
        train_step(model, opt, x, sampler(model, ids, x, i), min(1.0, i / steps))
    return model.net.state_dict()


def time_steps(cfg, splits, steps: int, net_state: dict, warmup: int = 3) -> tuple[float, dict]:
    torch.manual_seed(0)
    train_x = torch.from_numpy(splits.train_x)
    model = build_model(cfg, splits.image_shape)
    model.net.load_state_dict(net_state)
    opt = make_optimizer(model, cfg)
    search = TorchExactSearch(precision=cfg.prior.search_precision)
    sampler = PriorSampler(cfg.prior, train_x, search, seed=1)
    if cfg.prior.kind == "exemplar" and cfg.prior.rat:
        search.update(exemplar_centres(model, train_x))
    rng = np.random.default_rng(0)
    times, cands = [], []
    for i in range(warmup + steps):
        ids = rng.choice(train_x.shape[0], cfg.train.batch_size, replace=False)
        t0 = time.perf_counter()
        x = binarize(train_x[ids], True, 0, i, 0)
        m = train_step(model, opt, x, sampler(model, ids, x, i), 1.0)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cands.append(m["candidates"])
    return statistics.mean(times), {"candidates": statistics.mean(cands)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--exact-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int, default=500)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = config_mod.load(None, [], env=os.environ)
    splits = load_dataset(base.data)
    net_state = pretrained_net_state(base, splits, args.pretrain_steps)
    rows = []
    for label, overrides, steps in [
        ("gaussian prior", ["prior.kind=gaussian"], args.steps),
        ("exact exemplar prior (M=25,000)", ["prior.kind=exemplar", "prior.rat=false"], args.exact_steps),
        ("exact exemplar prior (M=25,000), bf16 encoding",
         ["prior.kind=exemplar", "prior.rat=false", "train.exemplar_precision=bfloat16"],
         args.exact_steps),
        ("RAT (k=10)", ["prior.kind=exemplar", "prior.rat=true"], args.steps),
        ("RAT (k=10), bf16 exemplar encoding", ["prior.kind=exemplar", "prior.rat=true",
                                                 "train.exemplar_precision=bfloat16"], args.steps),
        ("RAT (k=10), bf16 encoding + bf16 search", ["prior.kind=exemplar", "prior.rat=true",
                                                      "train.exemplar_precision=bfloat16",
                                                      "prior.search_precision=bfloat16"], args.steps),
    ]:
        cfg = config_mod.load(None, overrides, env=os.environ)
        seconds, extra = time_steps(cfg, splits, steps, net_state)
        rows.append((label, seconds, extra["candidates"]))
    base_s = rows[0][1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 100, MNIST 50,000, "
          f"weights after {args.pretrain_steps} RAT steps")
    print(f"| step | ms per step | x Gaussian | exemplars encoded |")
    print(f"|---|---|---|---|")
    for label, s, c in rows:
        print(f"| {label} | {s * 1e3:.1f} | {s / base_s:.2f} | {c:.0f} |")


if __name__ == "__main__":
    main()
