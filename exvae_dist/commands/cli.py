"""The command-line front of every exvae-dist command: parser, --help key list, logging, the
environment read once here, and the exit codes.

    python -m exvae_dist.train    [--config NAME|PATH] [--no-ray] [key=value ...]   (Ray Train)
    python -m exvae_dist.trainer  [--config NAME|PATH] [key=value ...]              (one process)
    python -m exvae_dist.evaluate / augment  RUN [key=value ...]   (evaluation/runs.py)

Precedence, the same for every command: command line > environment (EXVAE_DATA_DIR,
RAY_ADDRESS) > saved config (the YAML file, or the run's checkpoint) > defaults. Nothing below
these entry points reads the environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from .. import config as config_mod
from ..evaluation.runs import TrainedRun, load_run
from ..runs.checkpoint import UnreadableCheckpoint

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

TRAIN_DESCRIPTION = """\
Train an Exemplar VAE. Without --config the built-in defaults are the paper's MNIST Exemplar
VAE with retrieval augmented training. Everything goes to train.run_dir/<run name>/;
rerunning the same command resumes from its last checkpoint; Ctrl-C stops (exit 130) and the
same command resumes from the last checkpoint (each epoch's end, and within long epochs every
train.checkpoint_every_steps steps)."""

RAY_DESCRIPTION = """
Ray Train: TorchTrainer workers (DDP), a FAISS index service for retrieval augmented
training, asynchronous refresh of the exemplar latents, MLflow tracking. Connects to the Ray
cluster named by ray.address / RAY_ADDRESS (set for you under `ray job submit`), or starts a
local Ray on 127.0.0.1. --no-ray trains the same loop in this one process."""


def make_parser(prog: str, description: str, keys: Sequence[str] = (),
                notes: str = "") -> argparse.ArgumentParser:
    """A parser whose --help ends with `notes` and the config keys (those starting with
    `keys`, or all)."""
    return argparse.ArgumentParser(
        prog=prog, description=description,
        epilog=(notes + "\n\n" if notes else "") + "Config keys (override with key=value):\n"
               + config_mod.describe(tuple(keys) if keys else None),
        formatter_class=argparse.RawDescriptionHelpFormatter)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def train_command(prog: str, argv: Optional[list[str]], ray: bool) -> int:
    """`python -m exvae_dist.train` (ray=True) and `python -m exvae_dist.trainer`."""
    parser = make_parser(prog, TRAIN_DESCRIPTION + (RAY_DESCRIPTION if ray else ""))
    parser.add_argument("--config", default=None,
                        help="YAML file or bundled config name (configs/); default: built-in "
                             "defaults (the paper's MNIST Exemplar VAE)")
    if ray:
        parser.add_argument("--no-ray", action="store_true",
                            help="train in this process without Ray (python -m exvae_dist.trainer)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    args = parser.parse_intermixed_args(argv)  # overrides before or after --config
    setup_logging()
    use_ray = ray and not args.no_ray
    try:
        cfg = config_mod.load(args.config, args.overrides, env=os.environ)
        config_mod.check_trainer_keys(cfg, "ray" if use_ray else "one-process")
    except config_mod.ConfigError as err:
        parser.error(str(err))
    try:
        if use_ray:
            # A local Ray stays on loopback, without token auth or usage reporting; explicit
            # settings in the environment win.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            from ..train.driver import run

            summary = run(cfg)
        else:
            from ..train.local import fit

            summary = fit(cfg)
    except KeyboardInterrupt:
        from ..runs.checkpoint import describe_resume

        print(f"\ninterrupted: rerun the same command to resume "
              f"{describe_resume(cfg.run_path())}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except config_mod.ConfigError as err:
        parser.error(str(err))
    print(describe_result(summary))
    return 0


def describe_result(summary: dict) -> str:
    keys = ("epoch", "step", "train_loss", "val_elbo", "best_val_elbo", "examples_per_second",
            "stopped_early", "stopped_by_time_budget", "wall_hours")
    return json.dumps({k: summary[k] for k in keys if k in summary}, indent=2)


def run_command(prog: str, description: str, keys: Sequence[str], example: str,
                argv: Optional[list[str]]) -> Optional[TrainedRun]:
    """The command line shared by `evaluate` and `augment`: `<run> [key=value ...]`, --help
    listing the config keys that start with one of `keys`. Returns the loaded run, or None
    after printing why it could not be loaded (the command then exits with 2); a bad key
    exits through argparse."""
    parser = make_parser(prog, description, keys)
    parser.add_argument("run", help="run directory (runs/<name>), a checkpoint file, or an "
                                    "MLflow run id recorded under train.run_dir")
    parser.add_argument("overrides", nargs="*", help=f"key=value, e.g. {example}")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return load_run(args.run, args.overrides, env=os.environ)
    except config_mod.ConfigError as err:
        parser.error(str(err))
    except (FileNotFoundError, UnreadableCheckpoint) as err:
        print(f"error: {err}", file=sys.stderr)
    return None
