"""`python -m exvae_dist.ingest`: your images into an exemplar store (exvae_dist/commands/ingest.py)."""

import sys

from .commands.cli import guarded
from .commands.ingest import main

if __name__ == "__main__":
    sys.exit(guarded(main, None))
