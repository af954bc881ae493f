"""The index service: one Ray actor that owns the current index and answers kNN queries.

    handle = start_index_service(store_path, cfg.index, name="exvae-index")
    handle.refresh.remote(v)                      # returns at once; builds v in the background
    wait_for_version(handle, v, timeout=60)
    ids, dists, version = ray.get(handle.search.remote(mu, k, exclude_ids=batch_ids))

`IndexHolder` does the work and knows nothing about Ray: it owns one background builder
thread, keeps (version, index) as ONE reference that a build replaces atomically when it is
done, and answers each query from the pair it read at the start, so an answer never mixes two
versions. `IndexService` is the thin actor around it; Ray restarts it after a crash and its
constructor reloads the newest complete version from the store.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import faiss
import numpy as np

from exvae_dist.config import IndexConfig
from exvae_dist.retrieval.index import build_index, describe, search
from exvae_dist.retrieval.store import ExemplarStore, StoreError

log = logging.getLogger(__name__)


class IndexNotReady(RuntimeError):
    """A search before any index version has been built."""


@dataclass(frozen=True)
class _Served:
    """What a query reads: swapped as one reference, never field by field."""

    version: int
    index: faiss.Index
    n: int
    d: int
    build_seconds: float
    description: str


class IndexHolder:
    """The current index plus a background thread that builds the next one.

    store_path: an existing exemplar store (FileNotFoundError otherwise).
    load_latest: start building the newest complete version right away (a restart).
    """

    def __init__(self, store_path: str, cfg: IndexConfig, load_latest: bool = True):
        self.cfg = cfg
        self.store = ExemplarStore(store_path)
        faiss.omp_set_num_threads(max(1, cfg.service_threads))
        self._served: Optional[_Served] = None
        self._lock = threading.Lock()  # guards the fields below, not the index itself
        self._wake = threading.Condition(self._lock)
        self._pending: Optional[int] = None  # newest version asked for, not yet started
        self._building: Optional[int] = None  # version the thread is building now
        self._ready = threading.Condition(self._lock)  # notified after every build attempt
        self._queries = 0
        self._last_error: Optional[str] = None
        self._closed = False
        self._thread = threading.Thread(target=self._build_loop, name="index-builder",
                                        daemon=True)
        self._thread.start()
        if load_latest:
            newest = self.store.latest_complete()
            if newest is not None:
                self.refresh(newest)

    # -- queries ---------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, exclude_ids: Optional[np.ndarray] = None,
               wait_s: float = 60.0) -> tuple[np.ndarray, np.ndarray, int]:
        """ids [B, k] int64, squared distances [B, k] float32, and the version they come from.

        queries: [B, d] float32. exclude_ids: [B] int64, each row's own exemplar id, dropped
        from that row's answer (k + 1 are searched). If no version is loaded yet but one is
        being built (a fresh or restarted service), waits up to wait_s for it.
        """
        served = self._current(wait_s)
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != served.d:
            raise ValueError(f"queries must have shape [B, {served.d}] (the latent size of "
                             f"index version {served.version}), got {q.shape}")
        if exclude_ids is None:
            ids, dists = search(served.index, q, k)
        else:
            exclude_ids = np.asarray(exclude_ids, dtype=np.int64).reshape(-1)
            if exclude_ids.shape[0] != q.shape[0]:
                raise ValueError(f"exclude_ids must be [B]={q.shape[0]} ids, got "
                                 f"{exclude_ids.shape[0]}")
            ids, dists = _drop_own(*search(served.index, q, k + 1), exclude_ids)
        with self._lock:
            self._queries += q.shape[0]
        return ids, dists, served.version

    # -- versions --------------------------------------------------------------------------

    def refresh(self, version: Optional[int] = None) -> int:
        """Asks for the index of store version `version` (None: newest complete); returns at once.

        The build runs in the background while queries are answered from the current
        version. If several refreshes arrive during one build, only the newest is built next.
        Returns the version that will be built. Raises if that version is not complete.
        """
        if version is None:
            version = self.store.latest_complete()
            if version is None:
                raise IndexNotReady(f"the store {self.store.path} has no complete latent "
                                    f"version yet: write one and mark it complete first")
        elif version not in self.store.complete_versions():
            raise StoreError(f"latent version {version} of {self.store.path} is not complete "
                             f"(complete: {self.store.complete_versions()}); mark it complete "
                             f"before refreshing")
        with self._lock:
            if self._closed:
                raise RuntimeError("this IndexHolder is closed")
            newest_known = max(v for v in (self._pending, self._building, self._version(), 0)
                               if v is not None)
            if version > newest_known:
                self._pending = version
                self._wake.notify_all()
        return version

    def wait_for_version(self, version: int, timeout: float) -> int:
        """Blocks until the served version is >= `version`; returns it (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while (self._version() or 0) < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"index version {version} not served after {timeout} s "
                                       f"(status: {self._status_locked()})")
                self._ready.wait(left)
            return self._version()

    def status(self) -> dict[str, Any]:
        """version, n, d, kind, build_seconds, queries_served, building, pending, last_error."""
        with self._lock:
            return self._status_locked()

    def close(self, timeout: float = 10.0) -> None:
        """Stops the builder thread (after the build in progress, if any)."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout)

    # -- internals -------------------------------------------------------------------------

    def _version(self) -> Optional[int]:
        served = self._served
        return None if served is None else served.version

    def _status_locked(self) -> dict[str, Any]:
        served = self._served
        return {"version": None if served is None else served.version,
                "n": None if served is None else served.n,
                "d": None if served is None else served.d,
                "kind": None if served is None else served.description,
                "build_seconds": None if served is None else served.build_seconds,
                "queries_served": self._queries,
                "building": self._building is not None,
                "building_version": self._building,
                "pending": self._pending,
                "last_error": self._last_error,
                "store": str(self.store.path)}

    def _current(self, wait_s: float) -> _Served:
        served = self._served
        if served is not None:
            return served
        deadline = time.monotonic() + wait_s
        with self._lock:
            while self._served is None:
                if self._building is None and self._pending is None:
                    raise IndexNotReady(
                        f"no index version is loaded and none is being built: the store "
                        f"{self.store.path} has no complete latent version yet"
                        + (f" (last build failed: {self._last_error})" if self._last_error
                           else "") + "; write one, mark it complete and call refresh(v)")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise IndexNotReady(f"index version {self._building or self._pending} is "
                                        f"still being built after {wait_s} s; wait with "
                                        f"wait_for_version before searching")
                self._ready.wait(left)
            return self._served

    def _build_loop(self) -> None:
        # OpenMP's thread count is per calling thread: fewer build threads leave cores to
        # the queries (and to training workers) while a new version is built.
        faiss.omp_set_num_threads(max(1, self.cfg.build_threads))
        while True:
            with self._lock:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                version, self._pending = self._pending, None
                self._building = version
            try:
                served = self._build(version)
                error = None
            except Exception as err:  # keep serving the old version; report in status()
                log.exception("building index version %d failed", version)
                served, error = None, f"version {version}: {type(err).__name__}: {err}"
            with self._lock:
                if served is not None and served.version > (self._version() or 0):
                    self._served = served  # the atomic swap: one reference assignment
                self._last_error = error
                self._building = None
                self._ready.notify_all()

    def _build(self, version: int) -> _Served:
        start = time.perf_counter()
        latents = self.store.read_latents(version)
        index = build_index(latents, self.cfg)
        seconds = time.perf_counter() - start
        log.info("index version %d built in %.1f s: %s over %d x %d", version, seconds,
                 describe(index), *latents.shape)
        return _Served(version=version, index=index, n=latents.shape[0], d=latents.shape[1],
                       build_seconds=seconds, description=describe(index))


def _drop_own(ids: np.ndarray, dists: np.ndarray,
              own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[B, k+1] -> [B, k]: drops each row's own id, or its last slot when the id is absent."""
    drop = ids == own[:, None]
    missing = ~drop.any(axis=1)
    drop[missing, -1] = True
    keep = ~drop
    b, k1 = ids.shape
    return ids[keep].reshape(b, k1 - 1), dists[keep].reshape(b, k1 - 1)


# -- the Ray actor -------------------------------------------------------------------------

class IndexService:
    """Ray actor shell around IndexHolder (start it with start_index_service)."""

    def __init__(self, store_path: str, cfg: dict):
        logging.basicConfig(level=logging.INFO)
        self._holder = IndexHolder(store_path, IndexConfig(**cfg), load_latest=True)

    def search(self, queries: np.ndarray, k: int, exclude_ids: Optional[np.ndarray] = None
               ) -> tuple[np.ndarray, np.ndarray, int]:
        """See IndexHolder.search: (ids [B, k] int64, dists [B, k] float32, version)."""
        return self._holder.search(queries, k, exclude_ids)

    def refresh(self, version: Optional[int] = None) -> int:
        return self._holder.refresh(version)

    def status(self) -> dict[str, Any]:
        return self._holder.status()

    def ping(self) -> None:
        """A no-op call: the baseline of round-trip latency."""
        return None


def start_index_service(store_path: str, cfg: IndexConfig, name: Optional[str] = None,
                        max_concurrency: int = 4, max_restarts: int = -1):
    """Starts the IndexService actor (Ray must be initialised); returns its handle.

    num_cpus=0 so that it fits beside training workers that hold every CPU; several
    concurrent calls so that queries run while a rebuild does; FAISS gets
    cfg.service_threads OpenMP threads (Ray sets 1 in actors otherwise). Ray restarts it
    after a crash and retries calls that were in flight.
    """
    import ray  # the only Ray import: everything above works without it

    ExemplarStore(store_path)  # fail here, in the caller, if the store does not exist
    threads = str(max(1, cfg.service_threads))
    actor = ray.remote(IndexService).options(
        name=name, num_cpus=0, max_concurrency=max_concurrency, max_restarts=max_restarts,
        max_task_retries=3, runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}})
    return actor.remote(str(store_path), dataclasses.asdict(cfg))


def wait_for_version(handle, version: int, timeout: float = 120.0, poll_s: float = 0.05) -> dict:
    """Polls handle.status() until it serves `version` or newer; returns that status.

    TimeoutError (with the last status, including any build error) otherwise.
    """
    import ray

    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = ray.get(handle.status.remote(), timeout=max(1.0, deadline - time.monotonic()))
        if (status.get("version") or 0) >= version:
            return status
        time.sleep(poll_s)
    raise TimeoutError(f"index service did not serve version {version} within {timeout} s; "
                       f"last status: {status}")
