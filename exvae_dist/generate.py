"""`python -m exvae_dist.generate`: images drawn from a trained run's prior (exvae_dist/commands/generate.py)."""

import sys

from .commands.cli import guarded
from .commands.generate import main

if __name__ == "__main__":
    sys.exit(guarded(main, None))
