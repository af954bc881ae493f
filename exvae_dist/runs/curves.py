"""Validation curves: -ELBO per epoch of one or more runs, read from their metrics.jsonl.

    python -m exvae_dist.curves runs/mnist_vae_gaussian runs/mnist_vae_exemplar --out cmp.png
    python -m exvae_dist.curves docs/curves/mnist_vae_exemplar_200.jsonl --out ex.png

A source is a run folder or a metrics file on its own (`--keep FILE` copies a run's epoch
records into one, so a finished run's curve can be kept, e.g. in docs/, and overlaid later
after its folder is gone).

The training loop draws <run>/curves.png after every epoch (and logs it to MLflow under
curves/); this command overlays several runs, e.g. the priors of one protocol.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from ..evaluation.pictures import save_figure
from ..common.jsonio import write_jsonl


def epoch_records(run: Path) -> list[dict]:
    """The per-epoch records (the ones holding val_elbo), in order, of a run folder's
    metrics.jsonl or of a metrics file given itself; a line cut short by a crash is skipped."""
    path = Path(run) if Path(run).is_file() else Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder written by the "
                                f"trainer (it holds metrics.jsonl) or a metrics .jsonl file")
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("val_elbo") is not None:
            out.append(record)
    return out


def source_name(run: Path) -> str:
    """The legend's default label: the run folder's name, or a kept file's name sans suffix."""
    return run.stem if run.is_file() else run.name


def keep_records(run: Path, out: Path) -> Path:
    """Writes the run's epoch records alone to `out` (atomically)."""
    records = epoch_records(run)
    if not records:
        raise ValueError(f"{run} has no epoch records yet: keep it after its first epoch")
    return write_jsonl(out, records)


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
        label = labels[i] if labels else source_name(Path(run))
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
    parser.add_argument("runs", nargs="+", help="run folders written by the trainer, or "
                                                "metrics .jsonl files kept with --keep")
    parser.add_argument("--out", help="PNG file to write")
    parser.add_argument("--keep", help="instead of plotting: copy the one run's epoch records "
                                       "to this .jsonl file (small; plot it later as a source)")
    parser.add_argument("--labels", help="comma-separated legend labels, one per run "
                                         "(default: the run folders' names)")
    parser.add_argument("--title", help="plot title")
    args = parser.parse_args(argv)
    if args.keep:
        if len(args.runs) != 1:
            parser.error(f"--keep copies one run; {len(args.runs)} were given")
        print(keep_records(Path(args.runs[0]), Path(args.keep)))
        return
    if not args.out:
        parser.error("--out PNG is required (or --keep FILE)")
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        parser.error(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    print(plot_curves([Path(r) for r in args.runs], Path(args.out), labels, args.title))


if __name__ == "__main__":
    import sys

    from exvae_dist.commands.cli import guarded

    sys.exit(guarded(main, None))
