"""The command-line front of every exvae-dist command: the `exvae` console command and its
subcommands, parser, --help key list, logging, the environment read once here, the exit codes
and the one exception boundary (guarded).

    exvae <command> [args ...]   = python -m exvae_dist.<command> [args ...]   (COMMANDS)
    python -m exvae_dist.train    [--config NAME|PATH] [--no-ray] [key=value ...]   (Ray Train)
    python -m exvae_dist.trainer  [--config NAME|PATH] [key=value ...]              (one process)
    python -m exvae_dist.evaluate / augment  RUN [key=value ...]   (evaluation/runs.py)

Precedence, the same for every command: command line > environment (EXVAE_DATA_DIR,
RAY_ADDRESS) > saved config (the YAML file, or the run's checkpoint) > defaults. Nothing below
these entry points reads the environment.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Callable, Optional, Sequence

from .. import config as config_mod
from ..evaluation.runs import TrainedRun, load_run
from ..runs import run_folder
from ..runs.checkpoint import UnreadableCheckpoint

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_KNOWN_ERROR = 1  # a known error (errors.find_known), printed as one line
EXIT_USAGE = 2  # a bad command line or config (argparse's own code)

# exvae <name>: the module whose main(argv) it runs (also `python -m exvae_dist.<name>`), and
# the line `exvae --help` shows for it
COMMANDS = {
    "train": ("exvae_dist.train.__main__", "train on Ray Train (the default job); --no-ray "
                                           "trains in this process"),
    "trainer": ("exvae_dist.trainer", "train in this one process, without Ray"),
    "evaluate": ("exvae_dist.commands.evaluate", "test log-likelihood, ELBO, kNN error and "
                                                 "pictures of a trained run"),
    "generate": ("exvae_dist.commands.generate", "draw images from a trained run, with the "
                                                 "exemplar each came from"),
    "explain": ("exvae_dist.commands.explain", "the exemplars behind an image: attributions and "
                                      "memorisation"),
    "exemplars": ("exvae_dist.commands.exemplars", "grow (add) or list a trained run's "
                                                   "exemplar set without retraining"),
    "augment": ("exvae_dist.commands.augment", "generative data augmentation: classifiers trained "
                                      "with and without samples"),
    "ingest": ("exvae_dist.commands.ingest", "bring your own images: write an exemplar store to "
                                    "train on"),
    "curves": ("exvae_dist.commands.curves", "overlay the validation curves of runs"),
}

# set by main() while a subcommand runs, so that its --help says `exvae <name>`
_front_prog: Optional[str] = None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`exvae <command> [args ...]`: the console command (pyproject.toml [project.scripts])."""
    global _front_prog
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(front_help())
        return 0 if argv else EXIT_USAGE
    if argv[0] == "--version":
        from .. import __version__

        print(f"exvae-dist {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"exvae: unknown command {name!r}; the commands are {', '.join(COMMANDS)} "
              f"(exvae --help)", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(COMMANDS[name][0])
    _front_prog = f"exvae {name}"
    try:
        return guarded(module.main, argv[1:])
    finally:
        _front_prog = None


def front_help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: exvae <command> [args ...]   (exvae <command> --help for its options "
             "and config keys)", "",
             "Exemplar VAEs with retrieval augmented training, from a laptop to a Ray cluster.",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Each is also `python -m exvae_dist.<command>`; from Python: "
              "exvae_dist.fit(...) and exvae_dist.ExemplarVAE.load(...) (docs/api.md)."]
    return "\n".join(lines)


def guarded(command: Callable[[list[str]], Optional[int]], argv: Optional[Sequence[str]]) -> int:
    """The one exception boundary of every command: runs command(argv) and turns a known error
    (errors.find_known, also when Ray wraps it) into one line on stderr and exit 1 (2 for a
    config error), Ctrl-C into exit 130; anything else keeps its traceback (a bug)."""
    from ..common import errors

    try:
        return int(command(None if argv is None else list(argv)) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        known = errors.find_known(err)
        if known is None:
            raise
        print(f"error: {errors.one_line(known)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(known, config_mod.ConfigError) else EXIT_KNOWN_ERROR

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
        prog=_front_prog or prog, description=description,
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
        # under `ray job submit` a default ./runs would be deleted with the job's folder
        cfg = run_folder.outside_job_dir(
            cfg, run_folder.run_dir_given(args.config, args.overrides), os.environ)
    except config_mod.ConfigError as err:
        parser.error(str(err))
    return guarded(lambda _: _train(cfg, use_ray, parser), [])


def _train(cfg: config_mod.ExperimentConfig, use_ray: bool, parser) -> int:
    from ..api import train

    try:
        summary = train(cfg, use_ray)
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
