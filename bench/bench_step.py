"""Seconds per training step on MNIST with the paper's MLP VAE and batch 100: Gaussian prior
(the baseline), exact exemplar prior (M = 25,000) against a reference-style float32
implementation of the same step, and RAT (k = 10), in one run; `--only vampprior`: the
VampPrior (500 pseudo-inputs) step against the same step with the mixture density in its
former [B, K, d] broadcast form. The RAT group also times the RAT step under CPU bf16
autocast (measured and not adopted: bench/README.md, "bf16 autocast (not adopted)").

    EXVAE_DATA_DIR=../shared/data python bench/bench_step.py [--steps 30] [--exact-steps 5]

The variants run interleaved (one step of each per round), so a change in the machine's load
hits all of them alike. Prints a table of mean step times with their ratios to the Gaussian
step and to the reference-style exact step.

`--reference DIR` (a checkout of github.com/sajadn/Exemplar-VAE) adds the authors' own
Gaussian, exact and RAT steps to the same rounds, from the same weights and batches
(bench/authors_code.py), and a column with each of our steps over theirs of the same kind.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from authors_code import gate_halves  # this script's own folder is on sys.path
from exvae_dist import config as config_mod
from exvae_dist.core import priors
from exvae_dist.data import load_dataset
from exvae_dist.core.loop import binarize, make_optimizer
from exvae_dist.core.models.layers import diag_normal_log_prob
from exvae_dist.core.objective import build_model
from exvae_dist.core.candidates import nearest_members
from exvae_dist.core.exact import TorchExactSearch
from exvae_dist.core.step import PriorSampler, exemplar_centres, train_step


def pretrained_state(cfg, splits, steps: int, cache: str | None = None) -> dict:
    """The whole model (network and the prior's lambda) after `steps` RAT steps, so neighbour
    sets and responsibilities look like a real run's (a fresh encoder maps everything close
    together and retrieves far fewer unique exemplars). `cache`: a file to reuse it from."""
    if cache and Path(cache).is_file():
        return torch.load(cache)
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
    state = model.state_dict()
    if cache:
        torch.save(state, cache)
    return state


class AllExemplarsSearch:
    """A TorchExactSearch asked for the k nearest among S the way the index actors answer
    it: all N searched k' deep, S's members kept (candidates.nearest_members). The same
    candidates as the search of S alone (but for float32 near-ties at the last place), at
    the cost of a wider, deeper search."""

    def __init__(self, inner: TorchExactSearch, safety: float):
        self.inner, self.safety = inner, safety

    def search(self, queries, k, among):
        return nearest_members(self.inner.search, queries, k, among, self.safety)


class OurStep:
    """exvae-dist's step (PriorSampler + train_step) under config overrides."""

    def __init__(self, overrides, splits, state, all_n: bool = False, bf16: bool = False):
        cfg = config_mod.load(None, overrides, env=os.environ)
        self.bf16 = bf16  # forward and backward under CPU bf16 autocast (a lever not adopted)
        torch.manual_seed(0)
        self.train_x = torch.from_numpy(splits.train_x)
        self.model = build_model(cfg, splits.image_shape)
        self.model.load_state_dict(state, strict=cfg.prior.kind == "exemplar")
        self.opt = make_optimizer(self.model, cfg)
        search = TorchExactSearch()
        # all_n: the in-memory search's way before it searched the subset alone (4af9ae9)
        self.sampler = PriorSampler(cfg.prior, self.train_x,
                                    AllExemplarsSearch(search, cfg.prior.safety) if all_n
                                    else search, seed=1)
        if cfg.prior.kind == "exemplar" and cfg.prior.rat:
            search.update(exemplar_centres(self.model, self.train_x))
        self.extra: dict = {"candidates": []}

    def __call__(self, ids: np.ndarray, i: int) -> None:
        x = binarize(self.train_x[ids], True, 0, i, 0)
        prior = self.sampler(self.model, ids, x, i)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            m = train_step(self.model, self.opt, x, prior, 1.0)
        self.extra["candidates"].append(m["candidates"])


def broadcast_mixture_log_prob(z, means, logvars):
    """The VampPrior's mixture density in the form it had before (a [B, K, d] broadcast and
    its backward): the baseline of `--only vampprior`."""
    log_comp = diag_normal_log_prob(z[:, None, :], means[None], logvars[None])
    return torch.logsumexp(log_comp, dim=1) - math.log(means.shape[0])


class BroadcastMixtureStep(OurStep):
    """OurStep with priors.mixture_log_prob swapped for broadcast_mixture_log_prob."""

    def __call__(self, ids: np.ndarray, i: int) -> None:
        matmul_form, priors.mixture_log_prob = priors.mixture_log_prob, broadcast_mixture_log_prob
        try:
            super().__call__(ids, i)
        finally:
            priors.mixture_log_prob = matmul_form


class RefGated(nn.Module):
    """h(x) * sigmoid(g(x)) with two Linear layers, as the reference code writes it."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.h, self.g = nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.h(x) * torch.sigmoid(self.g(x))


class ReferenceStyleExactStep:
    """A plain float32 implementation of the exact-prior step, written from METHOD.md (not
    from the authors' code): encode the batch and the M subsampled exemplars with gradients,
    log p(z) = logsumexp_m log Normal(z; mu(x_m), s^2 I) - log(M - 1) with the own exemplar
    left out, one-sample ELBO, per-parameter gradient normalisation and a per-parameter Adam.
    Starts from the same weights as OurStep."""

    def __init__(self, splits, state, m: int = 25_000):
        self.train_x = torch.from_numpy(splits.train_x)
        self.m = m
        self.enc = nn.ModuleList([RefGated(784, 300), RefGated(300, 300)])
        self.mean, self.logvar = nn.Linear(300, 40), nn.Linear(300, 40)
        self.dec = nn.ModuleList([RefGated(40, 300), RefGated(300, 300)])
        self.out = nn.Linear(300, 784)
        self.log_var = nn.Parameter(state["prior.log_var"].clone())
        with torch.no_grad():  # our fused gate [h; g] -> the reference's two layers
            for ours, layers in (("net.encoder", self.enc), ("net.decoder", self.dec)):
                for j, layer in enumerate(layers):
                    wh, bh, wg, bg = gate_halves(state[f"{ours}.{j}.linear.weight"],
                                                 state[f"{ours}.{j}.linear.bias"])
                    layer.h.weight.copy_(wh); layer.h.bias.copy_(bh)
                    layer.g.weight.copy_(wg); layer.g.bias.copy_(bg)
            for mine, ours in ((self.mean, "net.q_z.mean"), (self.logvar, "net.q_z.logvar"),
                               (self.out, "net.decoder.2")):
                mine.weight.copy_(state[f"{ours}.weight"]); mine.bias.copy_(state[f"{ours}.bias"])
        self.params = [p for mod in (self.enc, self.mean, self.logvar, self.dec, self.out)
                       for p in mod.parameters()] + [self.log_var]
        self.opt = torch.optim.Adam(self.params, lr=5e-4, foreach=False)
        self.gen = torch.Generator().manual_seed(0)
        self.extra: dict = {"candidates": []}

    def encode(self, x):
        for layer in self.enc:
            x = layer(x)
        return self.mean(x), F.hardtanh(self.logvar(x), -6.0, 2.0)

    def __call__(self, ids: np.ndarray, i: int) -> None:
        self.opt.zero_grad()
        x = torch.bernoulli(self.train_x[ids], generator=self.gen)
        subset = torch.randperm(self.train_x.shape[0], generator=self.gen)[:self.m]
        exemplars = self.train_x[subset]
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=self.gen)
        h = z
        for layer in self.dec:
            h = layer(h)
        log_px = -F.binary_cross_entropy_with_logits(self.out(h), x, reduction="none").sum(1)
        log_q = -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp()).sum(1)
        centres = self.encode(exemplars)[0]  # [M, d] with gradients
        d2 = (z * z).sum(1, keepdim=True) - 2 * z @ centres.t() + (centres * centres).sum(1)[None]
        d = z.shape[1]
        log_comp = -0.5 * d * (math.log(2 * math.pi) + self.log_var) - d2 / (2 * self.log_var.exp())
        own = subset[None, :] == torch.as_tensor(ids)[:, None]
        log_comp = log_comp.masked_fill(own, float("-inf"))
        log_p = torch.logsumexp(log_comp, 1) - torch.log((~own).sum(1).float())
        loss = -(log_px - (log_q - log_p)).mean()
        loss.backward()
        for p in self.params:
            if p.grad is not None:
                p.grad /= p.grad.norm() + 1e-7
        self.opt.step()
        self.extra["candidates"].append(self.m)


def authors_counterpart(label: str) -> str:
    """The authors' variant a row of ours is compared with: same prior, same kind of step."""
    if label.startswith("authors'"):
        return ""
    if label.startswith("gaussian"):
        return "authors' code, Gaussian prior"
    if label.startswith("exact"):
        return "authors' code, exact (M=25,000)"
    return "authors' code, RAT (k=10)" if label.startswith("RAT") else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--exact-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--pretrained", default=None,
                   help="file to keep the pretrained weights in (reused when it exists)")
    p.add_argument("--only", default="all", choices=("all", "exact", "rat", "vampprior"))
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="a checkout of the authors' code (github.com/sajadn/Exemplar-VAE): "
                        "adds their Gaussian, exact and RAT steps to the rounds")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = config_mod.load(None, [], env=os.environ)
    splits = load_dataset(base.data)
    state = pretrained_state(base, splits, args.pretrain_steps, args.pretrained)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 100, MNIST 50,000, "
          f"weights after {args.pretrain_steps} RAT steps (lambda = {state['prior.log_var'].item():.2f})")

    gauss = ("gaussian prior", lambda: OurStep(["prior.kind=gaussian"], splits, state))
    exact = [
        gauss,
        ("exact, reference-style float32", lambda: ReferenceStyleExactStep(splits, state)),
        ("exact (M=25,000)", lambda: OurStep(["prior.rat=false"], splits, state)),
    ]
    rat = [
        gauss,
        ("RAT (k=10)", lambda: OurStep([], splits, state)),
        ("RAT, search over all N, k' deep (the index actors' way)",
         lambda: OurStep([], splits, state, all_n=True)),
        ("RAT (k=10), bf16 autocast", lambda: OurStep([], splits, state, bf16=True)),
    ]
    if args.reference:
        from authors_code import AuthorsStep

        def authors(kind):
            return lambda: AuthorsStep(kind, args.reference, splits, state)
        exact += [("authors' code, Gaussian prior", authors("gaussian")),
                  ("authors' code, exact (M=25,000)", authors("exact"))]
        rat += [("authors' code, Gaussian prior", authors("gaussian")),
                ("authors' code, RAT (k=10)", authors("rat"))]
    vamp = ["prior.kind=vampprior"]
    vampprior = [
        gauss,
        ("VampPrior (500), broadcast mixture (before)",
         lambda: BroadcastMixtureStep(vamp, splits, state)),
        ("VampPrior (500)", lambda: OurStep(vamp, splits, state)),
    ]
    groups = {"all": [(exact, args.exact_steps), (rat, args.steps)], "exact": [(exact, args.exact_steps)],
              "rat": [(rat, args.steps)], "vampprior": [(vampprior, args.steps)]}[args.only]
    for variants, steps in groups:
        runners = [(label, make()) for label, make in variants]
        ours = dict(runners).get("RAT (k=10)") or dict(runners).get("exact (M=25,000)")
        for label, run in runners:
            if label.startswith("authors'") and ours is not None:
                gap = run.check_weights(ours.model)
                print(f"{label}: encoder, decoder and lambda differ from ours by at most "
                      f"{gap:.1e} on the same weights")
                if gap > 1e-4:
                    raise SystemExit("the weights were not carried over to the authors' model")
        times = {label: [] for label, _ in runners}
        cpu = {label: [] for label, _ in runners}
        rng = np.random.default_rng(0)
        for i in range(3 + steps):  # 3 warm-up rounds; one step of every variant per round
            ids = rng.choice(splits.train_x.shape[0], 100, replace=False)
            for label, run in runners:
                t0, c0 = time.perf_counter(), time.process_time()
                run(ids, i)
                if i >= 3:
                    times[label].append(time.perf_counter() - t0)
                    cpu[label].append(time.process_time() - c0)
        wall = {label: statistics.mean(t) for label, t in times.items()}
        # CPU seconds of this process: at 1 thread, the work itself, hardly touched by other
        # processes on a loaded box (at 2 threads it also counts the OpenMP threads' spinning)
        mean = {label: statistics.mean(t) for label, t in cpu.items()}
        ref = mean.get("exact, reference-style float32")
        print(f"\n{os.getloadavg()[0]:.2f} load average (1 min) at the end")
        print("| step | wall ms per step | CPU ms per step | x Gaussian (CPU) "
              "| x reference-style exact (CPU) | x authors' code, same kind (CPU) "
              "| exemplars encoded |")
        print("|---|---|---|---|---|---|---|")
        for label, run in runners:
            c = [v for v in run.extra["candidates"] if v] or [0]
            vs_ref = f"{mean[label] / ref:.2f}" if ref and "exact" in label else ""
            theirs = mean.get(authors_counterpart(label))
            vs_authors = f"{mean[label] / theirs:.2f}" if theirs else ""
            print(f"| {label} | {wall[label] * 1e3:.1f} | {mean[label] * 1e3:.1f} "
                  f"| {mean[label] / mean['gaussian prior']:.2f} "
                  f"| {vs_ref} | {vs_authors} | {statistics.mean(c):.0f} |")


if __name__ == "__main__":
    main()
