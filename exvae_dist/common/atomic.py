"""Atomic writes: one temp-name scheme, one rename, nothing half-written, orphans swept.

Every file or folder the package writes goes through a temp name in the target's own folder
(so the rename is atomic: same file system) and is renamed over the target only once it is
complete; a failure removes the temp. The name is unique per writer, so concurrent writers
never share one:

    .<name>.tmp-<pid>-<8 hex><suffix>      e.g. .grid.png.tmp-4121-1f0c9a2e.png

(the target's suffix is kept for writers that pick a format from it: matplotlib, numpy).
A writer killed mid-write leaves its temp behind; `sweep_temps` removes those whose pid is
no longer alive (call it where a command starts: the run folder, the exemplar sets).

    with atomic_path(path, fsync=True) as tmp:
        torch.save(state, tmp)
    write_text(path, text)
    with atomic_dir(final) as tmp:          # a folder: filled, then renamed
        ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

# this scheme, then older ones still found in run folders written before it:
# .<name>.<pid>.tmp (jsonio), .<name>.tmp-<pid> (exemplar sets), .<name>.<pid>.tmp.npz
TEMP_NAMES = (re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(\.[^.]+)?$"),
              re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp(\.npz)?$"),
              re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$"))


def temp_path(path: str | os.PathLike) -> Path:
    """A unique temp name for `path`, in its folder (see the module docstring)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    """Makes a rename in `folder` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yields a temp path to write; when the block ends without an error it is renamed over
    `path` (fsync: the file's bytes and the rename are flushed to disk first, for what a
    power cut must not lose, e.g. checkpoints); on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temp folder to fill; renamed to `path` (which must not exist) when the
    block ends without an error, removed with its contents otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def orphan_pid(name: str) -> int | None:
    """The writer pid in a temp name of any scheme above, else None (not a temp)."""
    for pattern in TEMP_NAMES:
        found = pattern.match(name)
        if found:
            return int(found.group("pid"))
    return None


def sweep_temps(folder: str | os.PathLike) -> list[Path]:
    """Removes the temp files and folders in `folder` (not below it) whose writer is no
    longer alive; returns what was removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:  # missing or unreadable: nothing to sweep
        return removed
    for entry in entries:
        pid = orphan_pid(entry.name)
        if pid is None or pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.info("removed %d temp file(s) of killed writers in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed))
    return removed


__all__ = ["atomic_path", "atomic_dir", "write_text", "write_bytes", "temp_path",
           "sweep_temps", "pid_alive"]
