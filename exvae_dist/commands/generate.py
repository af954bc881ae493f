"""`python -m exvae_dist.generate RUN --n 10000 --out FILE.npz [--exemplars IDS] [--grid
FILE.png]`: the command line of evaluation/generation.py (what is drawn and written)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..runs.figures import save_grid

from ..evaluation.generation import (HOW, generate, save_npz)


def main(argv: Optional[list[str]] = None) -> int:
    from . import cli
    from .. import config as config_mod
    from ..api import ExemplarVAE
    from ..evaluation.exemplar_sets import ExemplarSetError, parse_ids

    parser = cli.make_parser(
        "python -m exvae_dist.generate", keys=("eval.", "train.threads"),
        description="Draw images from a trained run; record the exemplar (or pseudo-input) "
                    "each came from and that exemplar's label. Uses the exemplar set "
                    "eval.exemplars (grown by default).")
    parser.add_argument("run", help="run directory or MLflow run id")
    parser.add_argument("--n", type=int, default=10000, help="number of images (default 10000)")
    parser.add_argument("--out", required=True, help="output FILE.npz")
    parser.add_argument("--exemplars", default=None,
                        help="condition on these exemplar ids, used in turn: e.g. 0-9,42")
    parser.add_argument("--how", choices=HOW, default="mean",
                        help="decoder means (default) or draws x ~ p(x|z)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="also write the first --grid-n images "
                                                     "as a PNG grid here")
    parser.add_argument("--grid-n", type=int, default=100)
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. eval.exemplars=original")
    args = parser.parse_intermixed_args(argv)  # key=value may follow the options
    cli.setup_logging()
    try:
        if not args.out.endswith(".npz"):
            raise ValueError(f"--out {args.out}: the output is an .npz file")
        vae = ExemplarVAE.load(args.run, overrides=args.overrides)  # the API's model
        trained = vae.trained
        if trained.cfg.train.threads:
            torch.set_num_threads(trained.cfg.train.threads)
        ids = parse_ids(args.exemplars) if args.exemplars else None
        t0 = time.perf_counter()
        ex = vae.exemplar_set
        out = generate(vae.model, ex, args.n, ids, args.seed, args.how,
                       progress=trained.cfg.train.progress)
        info = {"run": str(trained.path), "checkpoint": str(trained.checkpoint),
                "prior": trained.model.prior_kind, "exemplars": ex.description,
                "exemplar_set_version": ex.version, "how": args.how, "seed": args.seed,
                "conditioned_on": args.exemplars}
        path = save_npz(Path(args.out), out, trained.image_shape, info)
        grid = None
        if args.grid:
            grid = save_grid(out["images"][:args.grid_n], args.grid, trained.image_shape,
                             title=f"{trained.model.prior_kind} prior, {ex.description}")
    except (ExemplarSetError, config_mod.ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(path), "n": args.n, "grid": str(grid) if grid else None,
                      "seconds": round(time.perf_counter() - t0, 2), **info}, indent=2))
    return 0
if __name__ == "__main__":
    from exvae_dist.commands.cli import guarded

    sys.exit(guarded(main, None))
