"""`python -m exvae_dist.explain`: the exemplars behind a generated or given image (exvae_dist/commands/explain.py)."""

import sys

from .commands.cli import guarded
from .commands.explain import main

if __name__ == "__main__":
    sys.exit(guarded(main, None))
