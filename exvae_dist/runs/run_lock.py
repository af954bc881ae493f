"""One run per folder: an exclusive lock file, taken before Ray or any training starts.

    with RunLock(cfg.run_path()):      # RunLocked if another live process holds it
        ...

The lock is `<run>/run.lock`, a JSON document {pid, host, started, argv} that appears whole
(written to a temp file, then hard-linked into place: os.link fails when the lock exists, so
two starts can never both take it). A lock whose pid is dead on this host is stale (a killed
run) and is taken over with a warning; a lock held from another host is refused, naming the
host and pid, since its liveness cannot be checked from here. `exclusive_run` wraps an entry
point (trainer.fit, train.driver.run): preflight checks, lock, sweep of orphans, then the run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..common.atomic import temp_path
from ..common.errors import KnownError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunLocked(KnownError, RuntimeError):
    """Another live process holds the run folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """Exclusive lock on a run folder (see the module docstring). Re-entrant in one process:
    a nested RunLock of the same folder is a no-op."""

    def __init__(self, run: str | os.PathLike):
        self.run = Path(run)
        self.folder = self.run  # where the lock file (and its temp file) go
        self.path = self.folder / LOCK_NAME
        self._held = False

    def owner(self) -> Optional[dict[str, Any]]:
        """The lock's document, {} if it is unreadable, None if there is no lock."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "argv": sys.argv}
        tmp = temp_path(self.path)  # linked, never renamed: a killed taker's is swept
        tmp.write_text(json.dumps(me))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic: fails when a lock exists
                    self._held = True
                    return self
                except FileExistsError:
                    holder = self.owner()
                    if holder is None:  # released in between: try again
                        continue
                    if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                        return self  # nested: the outer RunLock releases it
                    if not self._stale(holder):
                        raise RunLocked(self._refusal(holder)) from None
                    log.warning("taking over the stale lock %s of a dead process (%s)",
                                self.path, _describe(holder))
                    self.path.unlink(missing_ok=True)
            raise RunLocked(f"could not take {self.path}: other processes keep taking it")
        finally:
            tmp.unlink(missing_ok=True)

    def _stale(self, holder: dict) -> bool:
        if not holder:  # torn or empty: a writer died before link; only old ones are stale
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except FileNotFoundError:
                return True
        return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"]))

    def _refusal(self, holder: dict) -> str:
        here = holder.get("host") == socket.gethostname()
        return (f"run folder {self.run} is in use by another run ({_describe(holder)}): two runs "
                f"in one folder would mix checkpoints, metrics and store versions. Wait for it "
                f"to finish, stop it, or start this one under another train.name"
                + ("" if here else f"; if that process is gone, delete {self.path}"))

    def release(self) -> None:
        if self._held:
            holder = self.owner()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class StoreLocked(RunLocked):
    """Another live training run writes the latent versions of this exemplar store."""


class StoreWriterLock(RunLock):
    """The one training writer of an exemplar store outside the run folder (an ingested
    store, or index.store_path): its latent versions, their pruning and the index actors
    that reload the newest one belong to one run at a time. `<store>.writer.lock` beside
    the store (never inside it: the store's folder is Zarr's), taken and judged stale like a
    run folder's lock."""

    def __init__(self, store: str | os.PathLike):
        super().__init__(store)
        self.folder = self.run.parent
        self.path = self.folder / f"{self.run.name}.writer.lock"

    def acquire(self) -> "RunLock":
        try:
            return super().acquire()
        except RunLocked as err:
            raise StoreLocked(str(err)) from None

    def _refusal(self, holder: dict) -> str:
        here = holder.get("host") == socket.gethostname()
        return (f"exemplar store {self.run} is in use by another training run "
                f"({_describe(holder)}): two runs writing latent versions into one store "
                f"would prune and serve each other's latents. Wait for that run to finish or "
                f"stop it; train one run at a time per store"
                + ("" if here else f"; if that process is gone, delete {self.path}"))


def _describe(holder: dict) -> str:
    if not holder:
        return "lock file unreadable"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


def exclusive_run(entry: Callable) -> Callable:
    """Decorates an entry point `entry(cfg, ...)`: refuses inputs that cannot work
    (preflight.check_config), takes the run folder's lock, sweeps orphans of killed runs,
    runs, and releases the lock, all before Ray starts."""
    from . import checkpoint, preflight

    @functools.wraps(entry)
    def wrapper(cfg, *args, **kwargs):
        preflight.check_config(cfg)
        run = cfg.run_path()
        with RunLock(run):
            checkpoint.sweep_run_folder(run)
            return entry(cfg, *args, **kwargs)
    return wrapper
