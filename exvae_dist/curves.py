"""Validation curves: -ELBO per epoch of one or more runs, read from their metrics.jsonl.

    python -m exvae_dist.curves runs/mnist_vae_gaussian runs/mnist_vae_exemplar --out cmp.png

The training loop draws <run>/curves.png after every epoch (and logs it to MLflow under
curves/); this command overlays several runs, e.g. the priors of one protocol.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from .evaluation.pictures import save_figure


def epoch_records(run: Path) -> list[dict]:
    """The per-epoch records of a run's metrics.jsonl (the ones holding val_elbo), in order;
    a line cut short by a crash is skipped."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder written by the "
                                f"trainer (it holds metrics.jsonl)")
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("val_elbo") is not None:
            out.append(record)
    return out


def plot_curves(runs: Sequence[Path], out: Path, labels: Optional[Sequence[str]] = None,
                title: Optional[str] = None) -> Path:
    """One PNG: validation -ELBO (nats, lower is better) against epoch for each run, its best
    epoch marked; the y range leaves out the first epochs' large values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    tail = []
    for i, run in enumerate(runs):
        records = epoch_records(Path(run))
        if not records:
            continue
        epochs = [r["epoch"] for r in records]
        neg = [-r["val_elbo"] for r in records]
        label = labels[i] if labels else Path(run).name
        best = min(range(len(neg)), key=neg.__getitem__)
        line, = ax.plot(epochs, neg, lw=1.2, label=f"{label} (best {neg[best]:.2f} at "
                                                   f"epoch {epochs[best]})")
        ax.plot([epochs[best]], [neg[best]], "o", color=line.get_color(), ms=4)
        tail += neg[len(neg) // 10:]
    if tail:  # the first tenth of a run is far above the rest: zoom on where runs differ
        lo, hi = min(tail), max(tail)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1), hi + 0.05 * (hi - lo + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation -ELBO (nats)")
    ax.set_title(title or "validation -ELBO per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, Path(out))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m exvae_dist.curves",
        description="Plot the validation -ELBO per epoch of one or more training runs "
                    "(their metrics.jsonl) into one PNG.")
    parser.add_argument("runs", nargs="+", help="run folders written by the trainer")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--labels", help="comma-separated legend labels, one per run "
                                         "(default: the run folders' names)")
    parser.add_argument("--title", help="plot title")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        parser.error(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    print(plot_curves([Path(r) for r in args.runs], Path(args.out), labels, args.title))


if __name__ == "__main__":
    main()
