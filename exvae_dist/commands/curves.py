"""`python -m exvae_dist.curves`: validation curves of one or more runs in one PNG.

    python -m exvae_dist.curves runs/mnist_vae_gaussian runs/mnist_vae_exemplar --out cmp.png
    python -m exvae_dist.curves docs/curves/mnist_vae_exemplar_200.jsonl --out ex.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..runs.curves import keep_records, plot_curves


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
    main()
