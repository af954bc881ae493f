"""`python -m exvae_dist.curves`: training curves of one or more runs (exvae_dist/commands/curves.py)."""

import sys

from .commands.cli import guarded
from .commands.curves import main

if __name__ == "__main__":
    sys.exit(guarded(main, None))
