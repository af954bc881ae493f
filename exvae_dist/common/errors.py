"""Known errors: exceptions whose message says what went wrong and what to do, and which fail
the same way when the same thing runs again (a bad setting, a corrupt or missing file, a full
disk, a diverged loss).

Every such exception type derives from KnownError (beside its ordinary base: a ConfigError is
still a ValueError). The command line (commands/cli.guarded) prints a known error as one line
without a traceback and exits non-zero; the Ray driver (train/failures.py) ends a run at once
when a worker raises one instead of letting Ray Train restart the worker group. Pure Python:
Ray Train's wrappers are looked through by attribute, without importing Ray.
"""

from __future__ import annotations

from typing import Optional


class KnownError(Exception):
    """Base of the exceptions that are meant for the user and deterministic (module doc)."""


# a non-finite loss (core/step.py raises it with what to lower) is known too
BUILTIN_KNOWN = (FloatingPointError,)


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
    if isinstance(err, (KnownError, *BUILTIN_KNOWN)):
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
