"""`python -m exvae_dist.exemplars add RUN SOURCE` / `list RUN`: the command line of
evaluation/exemplar_sets.py (grown exemplar sets: what they are and how they are kept)."""

from __future__ import annotations

import json
import sys
from typing import Optional

import torch


from ..evaluation.exemplar_sets import (ExemplarSetError, _name, add_exemplars, list_versions, load_source, sets_dir)


def main(argv: Optional[list[str]] = None) -> int:
    from . import cli
    from .. import config as config_mod
    from ..evaluation.runs import load_run

    parser = cli.make_parser(
        "python -m exvae_dist.exemplars", keys=("eval.", "train.threads"),
        description="Grow a trained exemplar-prior model's exemplar set without retraining: "
                    "new images are encoded with the frozen encoder and appended as a new, "
                    "complete version under <run>/exemplar_sets/ (older versions untouched). "
                    "evaluate / generate / augment / explain then use the newest version; "
                    "eval.exemplars=original (or a version number) points them back.")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="append new exemplars as a new version")
    add.add_argument("run", help="run directory or MLflow run id")
    add.add_argument("source", help="FILE.npz (images, optional labels) or DATASET:SPLIT[:LABELS], "
                                    "e.g. mnist:train:5-9")
    add.add_argument("--n", type=int, default=None, help="add only the first N images")
    add.add_argument("--allow-test", action="store_true",
                     help="allow DATASET:test as SOURCE (evaluations of the grown set are then "
                          "not held out; refused without this)")
    add.add_argument("overrides", nargs="*", help="key=value, e.g. train.threads=1")
    lst = sub.add_parser("list", help="the stored versions of a run")
    lst.add_argument("run")
    # key=value may follow the options (argparse would not take them as positionals there)
    args, extra = parser.parse_known_args(argv)
    if any("=" not in e for e in extra):
        parser.error(f"unrecognized arguments: {' '.join(e for e in extra if '=' not in e)}")
    overrides = list(getattr(args, "overrides", None) or []) + extra
    cli.setup_logging()
    try:
        trained = load_run(args.run, overrides)
        if args.command == "list":
            for v in list_versions(trained.path):
                meta = json.loads((sets_dir(trained.path) / _name(v) / "set.json").read_text())
                print(f"v{v}: {meta['n']} exemplars: {meta['description']}")
            return 0
        if trained.cfg.train.threads:
            torch.set_num_threads(trained.cfg.train.threads)
        images, labels, desc = load_source(args.source, trained.cfg, args.allow_test)
        if args.n is not None and args.n < len(images):
            images, labels, desc = images[:args.n], labels[:args.n], f"the first {args.n} of {desc}"
        version = add_exemplars(trained, images, labels, desc)
    except (ExemplarSetError, config_mod.ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = json.loads((sets_dir(trained.path) / _name(version) / "set.json").read_text())
    print(json.dumps({"version": version, "added": meta["added"],
                      "folder": str(sets_dir(trained.path) / _name(version))}, indent=2))
    return 0
if __name__ == "__main__":
    from exvae_dist.commands.cli import guarded

    sys.exit(guarded(main, None))
