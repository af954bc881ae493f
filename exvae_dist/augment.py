"""`python -m exvae_dist.augment`: generative data augmentation with a trained run (exvae_dist/commands/augment.py)."""

import sys

from .commands.cli import guarded
from .commands.augment import main

if __name__ == "__main__":
    sys.exit(guarded(main, None))
