"""Test log-likelihood throughput: our evaluation vs a reference-style loop, in one run.

Baseline (the reference code's style): one test image at a time, S importance samples in
chunks of 1000, the exemplar prior as full float64 [1000, N] matrices (squared distances,
log-densities, logsumexp over all N exemplars). Ours: exvae_dist.evaluation.likelihood with
the certified candidate pool (exact to likelihood.PRIOR_TOLERANCE), and the k-nearest truncated
prior (a lower bound) for a few k, on the same images; the truncated estimates use the same
posterior samples as our exact one, so their gap is the truncation alone.

    EXVAE_DATA_DIR=../shared/data python bench/bench_evaluate.py \
        --run runs/results/mnist_vae_exemplar --images 50 --baseline-images 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch

from exvae_dist.data import load_dataset
from exvae_dist.evaluation.likelihood import chunk_sizes
from exvae_dist.evaluation.likelihood import PRIOR_TOLERANCE, estimate_log_likelihood
from exvae_dist.evaluation.runs import load_run
from exvae_dist.core.models.layers import LOG_2PI
from exvae_dist.core.objective import encode_means


@torch.no_grad()
def reference_style(model, x: torch.Tensor, centres: torch.Tensor, n_samples: int,
                    chunk: int = 1000) -> torch.Tensor:
    """One image at a time; the prior over all N as full float64 matrices."""
    c64 = centres.double()
    c_sq = (c64 * c64).sum(1)
    log_var = model.prior.log_var.double()
    n, d = c64.shape
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        parts = []
        for start in range(0, n_samples, chunk):
            s = min(chunk, n_samples - start)
            t = model.net.terms(xi.expand(s, -1), 1)  # S copies of the image, one sample each
            z = t.z_top[0].double()  # [s, d]
            d2 = (z * z).sum(1, keepdim=True) - 2.0 * z @ c64.t() + c_sq[None, :]  # [s, N]
            log_comp = -0.5 * d2 / torch.exp(log_var) - 0.5 * d * (LOG_2PI + log_var)
            log_p = torch.logsumexp(log_comp, dim=1) - math.log(n)
            log_w = (t.log_px[0] + t.log_p_cond[0] - t.log_q[0]).double() + log_p
            parts.append(torch.logsumexp(log_w, 0))
        out.append(torch.logsumexp(torch.stack(parts), 0) - math.log(n_samples))
    return torch.stack(out)


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/results/mnist_vae_exemplar",
                   help="a trained run with the exemplar prior (MNIST: N = 50,000)")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--images", type=int, default=50, help="test images for our code")
    p.add_argument("--baseline-images", type=int, default=3, help="test images for the baseline")
    p.add_argument("--neighbours", default="10,100,1000", help="k values of the truncated prior")
    p.add_argument("--batch", type=int, default=10, help="images per call of our code")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    trained = load_run(args.run)
    model = trained.model
    if model.prior_kind != "exemplar":
        raise SystemExit(f"{args.run} has a {model.prior_kind} prior; the bench needs an exemplar prior")
    splits = load_dataset(trained.cfg.data)
    centres = encode_means(model.net, torch.from_numpy(splits.train_x))
    x = torch.from_numpy(splits.test_x[:max(args.images, args.baseline_images)])
    e = trained.cfg.eval
    print(f"N = {centres.shape[0]}, S = {args.samples}, torch threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")

    sample_chunk, exemplar_chunk = chunk_sizes(x.device)

    def ours(images, k=None, seed=0):
        torch.manual_seed(seed)
        vals, pools, err = [], [], 0.0
        for s in range(0, images.shape[0], args.batch):
            r = estimate_log_likelihood(model, images[s:s + args.batch], args.samples, centres, k,
                                        e.prior_pool, PRIOR_TOLERANCE, sample_chunk,
                                        exemplar_chunk)
            vals.append(r.log_px)
            pools += r.pools
            err = max(err, r.max_error)
        return torch.cat(vals), pools, err

    torch.manual_seed(0)
    base, t_base = timed(lambda: reference_style(model, x[:args.baseline_images], centres,
                                                 args.samples))
    base_ips = args.baseline_images / t_base
    (exact, pools, err), t_exact = timed(lambda: ours(x[:args.images]))
    exact_ips = args.images / t_exact
    rows = [("reference style (float64, full S x N per image)", base_ips, 1.0, None, None),
            ("ours, exact (certified pool)", exact_ips, exact_ips / base_ips, 0.0,
             f"pool median {sorted(pools)[len(pools) // 2]}, max {max(pools)}, "
             f"certified error <= {err:.1e} nats")]
    result = {"n_exemplars": centres.shape[0], "samples": args.samples,
              "baseline_images": args.baseline_images, "images": args.images,
              "baseline_images_per_s": base_ips, "exact_images_per_s": exact_ips,
              "exact_speedup": exact_ips / base_ips,
              "exact_log_px": exact.tolist(), "pool_median": sorted(pools)[len(pools) // 2],
              "exact_minus_baseline_same_images": (exact[:args.baseline_images] - base.float()).tolist(),
              "truncated": {}}
    for k in [int(v) for v in args.neighbours.split(",") if v]:
        (low, _, _), t_k = timed(lambda: ours(x[:args.images], k))
        ips = args.images / t_k
        gap = (exact - low).mean().item()
        rows.append((f"ours, {k}-nearest truncated (LOWER BOUND)", ips, ips / base_ips, gap, ""))
        result["truncated"][k] = {"images_per_s": ips, "speedup": ips / base_ips,
                                  "mean_gap_nats": gap, "max_gap_nats": (exact - low).max().item()}
    print("\n| method | test images / s | x reference style | mean gap to exact (nats) | notes |")
    print("|---|---|---|---|---|")
    for name, ips, ratio, gap, note in rows:
        g = "" if gap is None else f"{gap:.4f}"
        print(f"| {name} | {ips:.3f} | {ratio:.1f} | {g} | {note or ''} |")
    print(f"\nmean log p(x): ours exact {exact.mean().item():.3f} over {args.images} images; on the "
          f"{args.baseline_images} baseline images ours {exact[:args.baseline_images].mean().item():.3f} vs "
          f"reference style {base.mean().item():.3f} (different samples)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
