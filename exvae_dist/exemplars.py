"""`python -m exvae_dist.exemplars`: grow, list and choose a run's exemplar sets (exvae_dist/commands/exemplars.py)."""

import sys

from .commands.cli import guarded
from .commands.exemplars import main

if __name__ == "__main__":
    sys.exit(guarded(main, None))
