"""Checkpoints written atomically (temp name, then rename) and read with clear errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

LATEST = "checkpoint.pt"
BEST = "best.pt"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Writes state to path through a temp file in the same folder, so a crash mid-write
    leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train a model first "
                                f"(python -m exvae_dist.train) or point to its run directory")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated/corrupt files
        raise RuntimeError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                           f"delete it to start over, or use {BEST} from the same folder") from err


def find_checkpoint(run: str | os.PathLike, prefer_best: bool = True) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file to load."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.exists():
        raise FileNotFoundError(f"run directory {run} does not exist")
    names = (BEST, LATEST) if prefer_best else (LATEST, BEST)
    for name in names:
        if (run / name).is_file():
            return run / name
    raise FileNotFoundError(f"run directory {run} holds no {BEST} or {LATEST}: "
                            f"did its training finish an epoch?")
