"""`python -m exvae_dist.train [--config NAME|PATH] [--no-ray] [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from .. import config as config_mod

DESCRIPTION = """\
Train an Exemplar VAE with Ray Train: TorchTrainer workers (DDP), a FAISS index service for
retrieval augmented training, asynchronous refresh of the exemplar latents, MLflow tracking.

Connects to the Ray cluster named by ray.address / RAY_ADDRESS (set for you under
`ray job submit`), or starts a local Ray on 127.0.0.1. Without --config the built-in
defaults are the paper's MNIST Exemplar VAE (configs/mnist_vae.yaml). Everything goes to
train.run_dir/<run name>/; rerunning the same command resumes from its last checkpoint.
--no-ray runs the same computation in this one process (exvae_dist.trainer)."""


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exvae_dist.train", description=DESCRIPTION,
        epilog="Config keys (override with key=value):\n" + config_mod.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML file or bundled config name (configs/); default: built-in "
                             "defaults (the paper's MNIST Exemplar VAE)")
    parser.add_argument("--no-ray", action="store_true",
                        help="train in this process without Ray (python -m exvae_dist.trainer)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except config_mod.ConfigError as err:
        parser.error(str(err))
    from .driver import describe_result, run

    if args.no_ray:
        from ..trainer import fit

        summary = fit(cfg)
    else:
        # A local Ray stays on loopback, without token auth or usage reporting; explicit
        # settings in the environment win.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        summary = run(cfg)
    print(describe_result(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
