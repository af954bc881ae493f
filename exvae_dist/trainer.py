"""`python -m exvae_dist.trainer [--config NAME|PATH] [key=value ...]`: the one-process trainer
(exvae_dist/train/local.py), no Ray."""

import sys
from typing import Optional

from .commands.cli import train_command


def main(argv: Optional[list[str]] = None) -> int:
    return train_command("python -m exvae_dist.trainer", argv, ray=False)


if __name__ == "__main__":
    sys.exit(main())
