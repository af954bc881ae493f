"""`python -m exvae_dist.train [--config NAME|PATH] [--no-ray] [key=value ...]` (cli.py)."""

from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    from ..commands.cli import train_command

    return train_command("python -m exvae_dist.train", argv, ray=True)


if __name__ == "__main__":
    from exvae_dist.commands.cli import guarded

    sys.exit(guarded(main, None))
