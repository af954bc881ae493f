"""`python -m exvae_dist.ingest SOURCE STORE [options]`: the command line of data/ingest.py,
which says what sources, checks, splits and resuming it does (`--help` lists every option)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional


from .cli import EXIT_INTERRUPTED

from ..data import ingest as ingest_library
from ..data.ingest import (IngestError, StoreFullError, ingest, open_source)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exvae_dist.ingest", description=ingest_library.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a .npy / .npz file, an image folder, a Zarr array, or "
                                   "deformed-mnist:N")
    ap.add_argument("store", help="the exemplar store to write (resumed if half-written)")
    ap.add_argument("--labels", help=".npy file (or Zarr array) of integer labels [N] for a "
                                     ".npy (or Zarr) source")
    ap.add_argument("--images-key", help="images member of an .npz (default: images, x, "
                                         "train_x or arr_0)")
    ap.add_argument("--labels-key", help="labels member of an .npz (default: labels, y or "
                                         "train_y, when present)")
    ap.add_argument("--valid", type=int, default=None,
                    help="validation rows held out of the source (default: 10%%, at most "
                         "10,000)")
    ap.add_argument("--test", type=int, default=None, help="test rows held out (default as "
                                                           "--valid)")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the held-out choice")
    ap.add_argument("--seed", type=int, default=0,
                    help="deformed-mnist: deformation seed (rows 50,000 and later; the first "
                         "50,000 are MNIST's own digits)")
    ap.add_argument("--block-rows", type=int, default=8192,
                    help="rows per written block = per chunk file (default 8192)")
    ap.add_argument("--latent-dim", type=int, default=40,
                    help="size of the latent tables the store will hold (= model.z_dim)")
    ap.add_argument("--data-root", default=None,
                    help="deformed-mnist: folder with the MNIST files (default "
                         "$EXVAE_DATA_DIR, else ~/.cache/exvae_dist/data)")
    ap.add_argument("--drop-duplicates", action="store_true",
                    help="leave out training rows whose pixels equal an earlier row's (kept "
                         "by default, and counted: leave-one-out is by row id, so a twin "
                         "stays in its image's prior); reads the source once more")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import os
    args.data_root = args.data_root or os.environ.get("EXVAE_DATA_DIR")
    try:
        source = open_source(args.source, args)
        if getattr(source, "classes", None):
            print("labels (class folder -> label, sorted by name; kept in the store's "
                  "label_map): " + ", ".join(f"{name} -> {label}"
                                            for label, name in enumerate(source.classes)))
        default = max(1, min(10_000, source.n // 10))
        fingerprint = ingest(source, args.store,
                             n_valid=args.valid if args.valid is not None else default,
                             n_test=args.test if args.test is not None else default,
                             split_seed=args.split_seed, block_rows=args.block_rows,
                             progress=not args.no_progress, latent_dim=args.latent_dim,
                             drop_duplicates=args.drop_duplicates)
    except (IngestError, FileExistsError, ValueError, StoreFullError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if Path(args.store).expanduser().exists():
            print(f"\ninterrupted: {args.store} is half-written and refused until finished; "
                  f"rerun the same command to resume from its last written block",
                  file=sys.stderr)
        else:
            print(f"\ninterrupted before {args.store} was started: nothing was written",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{args.store}: fingerprint {fingerprint}\n"
          f"train on it: python -m exvae_dist.train data.name=store data.store={args.store}")
    return 0
if __name__ == "__main__":
    from exvae_dist.commands.cli import guarded

    sys.exit(guarded(main, None))
