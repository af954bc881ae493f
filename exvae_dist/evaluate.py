"""`python -m exvae_dist.evaluate`: log-likelihood, kNN error and pictures of a trained run (exvae_dist/commands/evaluate.py)."""

import sys

from .commands.cli import guarded
from .commands.evaluate import main

if __name__ == "__main__":
    sys.exit(guarded(main, None))
