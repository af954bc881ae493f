"""Checkpoints written atomically (temp name, then rename) and read with clear errors.

The latest checkpoint keeps its predecessor (checkpoint.pt -> checkpoint.prev.pt on each save),
so a resume that finds the newest one unreadable falls back to the previous good one, says
so, and never starts over while a readable checkpoint exists (`load_resume_state`,
`first_readable`). A failed write (a full disk, an I/O error) is named as such, with the path
and the free space, and leaves the last good checkpoint as it was. `sweep_run_folder` removes
what killed writers leave behind: temp files of dead writers (atomic.sweep_temps) and Ray
checkpoint folders that Ray never registered.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from ..common.atomic import atomic_path, sweep_temps
from ..common.errors import KnownError

log = logging.getLogger(__name__)

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
BEST = "best.pt"
# Ray Train V2's record of the checkpoints it registered, in <storage_path>/<name>/
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
RAY_FOLDER_PREFIX = "checkpoint_"

T = TypeVar("T")


class CheckpointWriteError(KnownError, OSError):
    """Writing a checkpoint failed (errno ENOSPC for a full disk); the message names the
    path and the free space, and the last good checkpoint is intact."""


def previous_path(path: str | os.PathLike) -> Path:
    """checkpoint.pt -> checkpoint.prev.pt (the copy kept by the next save)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any],
                    keep_previous: Optional[bool] = None) -> Path:
    """Writes state to path through a temp file in the same folder, so a crash mid-write
    leaves the previous checkpoint intact.

    keep_previous (default: only for checkpoint.pt) moves the file being replaced to
    previous_path(path) first, so two checkpoints always exist for the resume to choose from.
    """
    path = Path(path)
    if keep_previous is None:
        keep_previous = path.name == LATEST
    try:
        with atomic_path(path, fsync=True) as tmp:  # on disk before it replaces the last one
            torch.save(state, tmp)
            if keep_previous and path.is_file():
                os.replace(path, previous_path(path))
    except CheckpointWriteError:
        raise
    except (OSError, RuntimeError) as err:  # torch reports ENOSPC as "iostream error"
        raise _write_error(path, err) from err
    return path


def _write_error(path: Path, err: BaseException) -> CheckpointWriteError:
    """A full disk named as such: free space of path's file system, the checkpoint kept."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    # torch.save's C++ writer loses errno; a disk with less room than the checkpoint it
    # replaces (or under 1 MiB) is full for our purpose
    needed = max(path.stat().st_size if path.is_file() else 0, 1 << 20)
    full = getattr(err, "errno", None) == errno.ENOSPC or 0 <= free < needed
    kept = (f"the last good checkpoint {path} is intact" if path.is_file()
            else "no earlier checkpoint was there")
    free_text = f"{free / 2**20:.1f} MiB free" if free >= 0 else "free space unknown"
    if full:
        return CheckpointWriteError(
            errno.ENOSPC, f"no space left on device writing checkpoint {path} ({free_text} on "
            f"{path.parent}; {type(err).__name__}: {err}); {kept}. Free space (or point "
            f"train.run_dir at a larger disk) and rerun the same command to resume")
    return CheckpointWriteError(
        getattr(err, "errno", None) or errno.EIO,
        f"I/O error writing checkpoint {path} ({type(err).__name__}: {err}; {free_text} on "
        f"{path.parent}); {kept}")


class UnreadableCheckpoint(KnownError, ValueError):
    """A checkpoint file that exists but does not load (truncated, corrupt)."""


class AllCheckpointsUnreadable(KnownError, RuntimeError):
    """Every checkpoint of a run failed to load: the run refuses to start over from step 0."""


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train a model first "
                                f"(python -m exvae_dist.train) or point to its run directory")
    try:
        verify_digest(path)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated/corrupt files
        raise UnreadableCheckpoint(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                           f"delete it to start over, or load an older one of the same "
                           f"run ({PREVIOUS}, {BEST})") from err


def verify_digest(path: Path) -> None:
    """Checks every entry of a checkpoint against the CRC-32 digest torch.save stores for it in
    the zip archive (torch.load itself does not check them, and loads random bytes written
    into a tensor as weights). Raises zipfile.BadZipFile (or ValueError) when one differs."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise ValueError(f"entry {bad} fails its CRC-32 digest: the file's bytes changed "
                         f"after it was written")


def first_readable(candidates: Sequence[Path], load: Callable[[Path], T],
                   what: str = "checkpoint") -> Optional[tuple[T, Path]]:
    """(load(c), c) for the first candidate (newest first) that loads; None if there are none.

    Each unreadable one is skipped with a warning; when every candidate is unreadable this
    raises (RuntimeError) rather than returning None: a run never silently starts over from
    step 0 while its checkpoints exist.
    """
    failures = []
    for candidate in candidates:
        try:
            value = load(candidate)
        except Exception as err:  # a truncated file, a missing key, a torn folder
            failures.append(f"{candidate}: {type(err).__name__}: {err}")
            log.warning("%s %s is unreadable (%s: %s); trying the previous one", what,
                        candidate, type(err).__name__, err)
            continue
        if failures:
            log.warning("resuming from the previous good %s %s: %d newer one(s) unreadable",
                        what, candidate, len(failures))
        return value, candidate
    if failures:
        raise AllCheckpointsUnreadable(
            f"every {what} is unreadable, refusing to start over from step 0: "
            + "; ".join(failures) + ". Delete them (or the run folder) to start the run afresh")
    return None


def resume_candidates(run: str | os.PathLike) -> list[Path]:
    """The one-process trainer's checkpoints in a run folder, newest first (by modification
    time; checkpoint.pt, checkpoint.prev.pt, best.pt on a tie): a best.pt written after
    checkpoint.prev.pt is the better fallback."""
    run = Path(run)
    found = [run / name for name in (LATEST, PREVIOUS, BEST) if (run / name).is_file()]
    return sorted(found, key=lambda p: -p.stat().st_mtime_ns)  # stable: ties keep that order


def load_resume_state(run: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The state to resume run from (falling back past unreadable checkpoints), or None for
    a fresh run."""
    found = first_readable(resume_candidates(run), load_checkpoint)
    return None if found is None else found[0]


def ray_resume_candidates(registered: Optional[Path], run: str | os.PathLike) -> list[Path]:
    """Folders a Ray worker may resume from, newest (largest step) first: the checkpoint Ray
    hands back, the other Ray checkpoint folders of the run, and the run folder itself (rank
    0's checkpoint.pt). Ray registers a reported checkpoint only when its controller next
    polls (every 2 s): after Ctrl-C the run folder's checkpoint.pt, written just before the
    report, can be newer than anything Ray registered, and is then the one to resume."""
    run = Path(run)
    out = [Path(registered)] if registered is not None else []
    folders = sorted((p for p in run.glob(RAY_FOLDER_PREFIX + "*") if p.is_dir()),
                     key=lambda p: p.name, reverse=True)  # names carry a sortable timestamp
    out += [p for p in folders if p not in out]
    if (run / LATEST).is_file():
        out.append(run)
    return sorted(out, key=lambda p: _position(p)[1], reverse=True)  # stable: ties keep order


def _position(path: Path) -> tuple[int, int]:
    """(epoch, step) of a checkpoint file or folder, read without loading its tensors;
    (-1, -1) when it is unreadable."""
    path = path / LATEST if path.is_dir() else path
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(state["epoch"]), int(state["step"])
    except Exception:
        return -1, -1


def resume_point(run: str | os.PathLike) -> Optional[tuple[int, int]]:
    """(epoch, step) a rerun of `run` resumes from, the epoch counted from 1 as the epoch
    lines count it (the epoch being trained): its newest readable checkpoint, in the order
    either trainer tries them; None when there is none."""
    for candidate in [*ray_resume_candidates(None, run), *resume_candidates(run)]:
        epoch, step = _position(candidate)
        if step >= 0:
            return epoch + 1, step
    return None


def describe_resume(run: str | os.PathLike) -> str:
    """`<run> from epoch E step S` (or `<run> from its start`) for the interrupt message."""
    point = resume_point(run)
    where = f"epoch {point[0]} step {point[1]}" if point else "its start (no checkpoint yet)"
    return f"{run} from {where}"


def registered_ray_folders(run: Path) -> Optional[set[str]]:
    """Names of the checkpoint folders in Ray Train's snapshot; None if it is absent or
    unreadable (then nothing may be judged unregistered)."""
    try:
        snapshot = json.loads((run / RAY_SNAPSHOT).read_text())
    except (OSError, ValueError):
        return None
    names: set[str] = set()

    def walk(value):  # the snapshot's schema changes between Ray versions: look at strings
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and RAY_FOLDER_PREFIX in value:
            names.add(Path(value.rstrip("/")).name)
    walk(snapshot)
    return names


def sweep_run_folder(run: str | os.PathLike) -> list[Path]:
    """Removes orphans of killed writers in run: temp files of writers no longer alive
    (checkpoints, .metrics.jsonl, pictures: atomic.sweep_temps), the `*.pt.*.tmp` files of
    earlier versions, and Ray checkpoint folders missing from Ray's snapshot. Call it only
    while holding the run's lock. Returns what was removed."""
    run = Path(run)
    if not run.is_dir():
        return []
    removed = sweep_temps(run)
    for folder in run.glob(RAY_FOLDER_PREFIX + "*"):
        if folder.is_dir():
            removed += sweep_temps(folder)
    for tmp in list(run.glob("*.pt.*.tmp")) + list(run.glob(RAY_FOLDER_PREFIX + "*/*.pt.*.tmp")):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    registered = registered_ray_folders(run)
    if registered is not None:
        for folder in run.glob(RAY_FOLDER_PREFIX + "*"):
            if folder.is_dir() and folder.name not in registered:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    if removed:
        log.info("removed %d orphan(s) of an earlier killed run in %s: %s", len(removed), run,
                 ", ".join(p.name for p in removed))
    return removed


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
