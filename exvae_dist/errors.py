"""Which exceptions are known (their message says what went wrong and what to do) and
deterministic (running the same thing again fails the same way).

The command line (cli.guarded) prints a known error as one line without a traceback and exits
non-zero; the Ray driver (train/failures.py) ends a run at once when a worker raises a
deterministic one instead of letting Ray Train restart the worker group. Pure Python: the
wrappers of other libraries (Ray Train's worker and controller errors) are looked through by
attribute, without importing them.
"""

from __future__ import annotations

from typing import Optional


def known_types() -> tuple[type, ...]:
    """The exception types whose message is meant for the user (imported lazily: the modules
    that define them import torch)."""
    from .runs.checkpoint import (AllCheckpointsUnreadable, CheckpointWriteError,
                                  UnreadableCheckpoint)
    from .config import ConfigError
    from .data.download import ChecksumMismatchError, DataFileMissingError
    from .data.store_data import StoreMismatchError
    from .evaluation.runs import RunNotFoundError
    from .commands.exemplars import ExemplarSetError
    from .commands.ingest import IngestError
    from .retrieval.store import StoreError
    from .runs.run_lock import RunLocked

    return (ConfigError, RunLocked, ChecksumMismatchError, DataFileMissingError,
            UnreadableCheckpoint, CheckpointWriteError, FloatingPointError, StoreError,
            StoreMismatchError, ExemplarSetError, IngestError, RunNotFoundError,
            AllCheckpointsUnreadable, InputShapeError)


class InputShapeError(ValueError):
    """Images given to the Python API (api.ExemplarVAE) in a shape or range it cannot use."""


def _inner(err: BaseException) -> list[BaseException]:
    """The exceptions an exception wraps: Ray Train's worker-group error (one per rank), its
    controller error, a worker's exception with its traceback, a Ray task error's cause."""
    found = []
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict):
        found += [e for e in failures.values() if isinstance(e, BaseException)]
    for attr in ("controller_failure", "_base_exc", "cause"):
        inner = getattr(err, attr, None)
        if isinstance(inner, BaseException) and inner is not err:
            found.append(inner)
    if err.__cause__ is not None and type(err).__module__.startswith("ray"):
        found.append(err.__cause__)
    return found


def find_known(err: BaseException, _depth: int = 0) -> Optional[BaseException]:
    """`err` itself, or the first known error it wraps (looking through Ray's wrappers), or
    None."""
    if isinstance(err, known_types()):
        return err
    if _depth > 6:
        return None
    for inner in _inner(err):
        hit = find_known(inner, _depth + 1)
        if hit is not None:
            return hit
    return None


def one_line(err: BaseException) -> str:
    """The message on one line (a ChecksumMismatchError lists files on several)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__
