"""Time to quality: validation ELBO against wall time for three MNIST RAT training recipes.

Reads epoch lines (the ones with "epoch" and "val_elbo") of metrics.jsonl files; an epoch's
wall time is its "epoch_seconds" (training steps + refresh + validation). Prints one row per
recipe: epochs run, best validation ELBO, minutes to the first epoch at or above --target
(cumulative epoch_seconds), minutes to the best epoch, and minutes-to-target as a multiple
of the paper recipe's; then the minutes to within 1 and 0.5 nats of the target (useful
where the target is not reached). Saves the three curves as a PNG (--plot).

- paper:   our paper-protocol run (--paper, default the kept 200-epoch curve in docs/curves);
- fast:    our fast recipe (--fast, default runs/mnist_vae_exemplar_fast/metrics.jsonl), from
           python -m exvae_dist.trainer --config mnist_vae_exemplar_fast train.threads=2 \\
               train.progress=false
- authors: sajadn/Exemplar-VAE, which cannot be run to 200 epochs here. MODELLED as our paper
           curve's ELBO per epoch (same protocol: model, prior, warm-up, lr, batch), each epoch
           taking --authors-epoch-seconds (default 39.0: their steady-state MNIST RAT epoch,
           train + validation, at 2 threads: "their ~39 s" in bench/README.md, "Step by step
           beside the authors' code", from their epoch 2 at 36-40 s in the side-by-side
           tables just above it). To remeasure:
           `bench/bench_step.py --threads 2 --steps 30 --only rat --reference DIR` gives their
           step time (an epoch is 500 steps plus their validation pass), or time their
           density_estimation.py epochs directly as in that README section. With a real run
           of theirs converted to this JSONL format, pass --authors-log to use it instead.

    python bench/bench_quality.py                      # the kept curves of docs/curves/
    python bench/bench_quality.py --fast runs/mnist_vae_exemplar_fast/metrics.jsonl \\
        --target -88.87 --plot bench/out/quality.png   # a fresh fast run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FAST_COMMAND = ("python -m exvae_dist.trainer --config mnist_vae_exemplar_fast "
                "train.threads=2 train.progress=false")


def load_curve(path: Path) -> list[tuple[int, float, float]]:
    """(epoch, cumulative wall minutes, val ELBO) per epoch line, in epoch order."""
    from exvae_dist.runs.curves import epoch_records  # skips a line torn by a crash

    by_epoch = {r["epoch"]: r for r in epoch_records(path) if "epoch" in r}
    out, minutes = [], 0.0
    for epoch in sorted(by_epoch):
        minutes += by_epoch[epoch]["epoch_seconds"] / 60.0
        out.append((epoch, minutes, by_epoch[epoch]["val_elbo"]))
    return out


def minutes_to(curve, level: float):
    """(minutes, epoch) of the first epoch whose ELBO reaches `level`, or None."""
    return next(((m, e) for e, m, v in curve if v >= level), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", type=Path, default=REPO / "docs/curves/mnist_vae_exemplar_200.jsonl")
    p.add_argument("--fast", type=Path, default=REPO / "docs/curves/mnist_vae_exemplar_fast.jsonl",
                   help="the fast run's metrics.jsonl (default: the 2026-12-06 run, kept)")
    p.add_argument("--authors-log", type=Path, default=None,
                   help="a real run of the authors' code in the same JSONL format (replaces the model)")
    p.add_argument("--authors-epoch-seconds", type=float, default=39.0)
    p.add_argument("--target", type=float, default=-88.87,
                   help="val ELBO to reach (default: the paper-protocol run's best)")
    p.add_argument("--plot", type=Path, default=REPO / "bench/out/quality.png")
    args = p.parse_args()

    if not args.fast.is_file():
        p.error(f"fast-recipe metrics not found: {args.fast}\n  make them with: {FAST_COMMAND}"
                f"\n  (or pass --fast PATH)")
    for path in (args.paper, args.authors_log):
        if path is not None and not path.is_file():
            p.error(f"metrics not found: {path}")

    paper = load_curve(args.paper)
    curves = {"paper": paper, "fast": load_curve(args.fast)}
    if args.authors_log is not None:
        curves["authors"] = load_curve(args.authors_log)
        authors_note = f"authors: measured, {args.authors_log}"
    else:  # same ELBO per epoch as our paper run, at their measured wall time per epoch
        curves["authors"] = [(e, e * args.authors_epoch_seconds / 60.0, v) for e, _, v in paper]
        authors_note = (f"authors: MODELLED as our paper recipe's ELBO per epoch (same protocol, "
                        f"an assumption) at {args.authors_epoch_seconds:.1f} s per epoch")
    for name, curve in curves.items():
        if not curve:
            p.error(f"{name}: no epoch lines (with val_elbo) yet")

    print(f"target val ELBO {args.target:.2f}; paper: {args.paper}; fast: {args.fast}")
    print(authors_note + "\n")
    paper_hit = minutes_to(paper, args.target)
    print("| recipe | epochs run | best val ELBO (epoch) | minutes to target | minutes to best "
          "| x paper (to target) |")
    print("|---|---|---|---|---|---|")
    for name, curve in curves.items():
        best_e, best_m, best_v = max(curve, key=lambda row: row[2])  # first epoch of the best
        hit = minutes_to(curve, args.target)
        to_target = (f"{hit[0]:.1f} (epoch {hit[1]})" if hit else
                     f"not reached (best {best_v:.2f} at {best_m:.1f} min)")
        ratio = f"{hit[0] / paper_hit[0]:.2f}" if hit and paper_hit else "-"
        print(f"| {name} | {len(curve)} | {best_v:.2f} ({best_e}) | {to_target} "
              f"| {best_m:.1f} | {ratio} |")

    print()
    for nats in (1.0, 0.5):  # how close the fast recipe gets, and how soon, if it misses
        hit = minutes_to(curves["fast"], args.target - nats)
        where = f"{hit[0]:.1f} min (epoch {hit[1]})" if hit else "not reached"
        print(f"fast, within {nats} nat(s) of the target (>= {args.target - nats:.2f}): {where}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from exvae_dist.runs.figures import save_figure  # temp name in the folder, then os.replace

    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=100)
    for name, curve in curves.items():
        label = name + (" (modelled)" if name == "authors" and args.authors_log is None else "")
        ax.plot([m for _, m, _ in curve], [v for _, _, v in curve], lw=1.2, label=label)
    ax.axhline(args.target, ls="--", color="grey", lw=1, label=f"target {args.target:.2f}")
    # the first epochs sit tens of nats below: zoom on the approach to the target
    ax.set_ylim(args.target - 15, args.target + 3)
    ax.set_xlabel("wall time (minutes, cumulative epoch_seconds)")
    ax.set_ylabel("validation ELBO (nats)")
    ax.set_title("MNIST Exemplar VAE (RAT): validation ELBO against wall time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    print(f"\nplot: {save_figure(fig, args.plot)}")


if __name__ == "__main__":
    main()
