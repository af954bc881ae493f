"""The index service: Ray actors that own the index (one, or S shards) and answer kNN queries.

    handle = start_index_service(store_path, cfg.index, name="exvae-index")   # all rows
    handles = start_index_shards(store_path, cfg.index, name="exvae-index", shards=2)
    handle.refresh.remote(v)                      # returns at once; builds v in the background
    ShardedSearch([handle]).wait_served(v)       # train/service_client.py
    ids, dists, version = ray.get(handle.search.remote(mu, k))

`IndexHolder` does the work and knows nothing about Ray: it owns one background builder
thread and the versions it holds as ONE dict reference that a build replaces atomically
when it is done; each query reads the index it uses once, so an answer never mixes two
versions. `IndexService` is the thin actor around it; Ray restarts it after a crash and its
constructor reloads the newest complete version from the store.

Shards and versions. Shard s of S owns the contiguous rows [N s / S, N (s+1) / S) of every
latent version and answers with global ids. Versions across shards are kept consistent by
naming them (the client, train/service_client.ShardedSearch, does this):

- every answer of `answer(queries, k, version)` also returns the versions the shard holds
  ("ready"); a shard that does not hold the named version answers no ids, only "ready";
- a shard holds at most two versions: the newest it built, and the newest version some
  query has named ("committed": a client names v only once EVERY shard held v);
- so a client asks every shard for the same v, and moves to a newer v only after all
  shards' "ready" lists contain it. A shard that built v+1 keeps v (committed) until the
  first query naming v+1 arrives, and then drops v.

Unnamed queries (`search(..., version=None)`, the one-actor API) use the newest version held.
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
from exvae_dist.retrieval.index import DEFAULT_RECALL_K, IndexBuilder, describe, search
from exvae_dist.retrieval.store import ExemplarStore, StoreError

log = logging.getLogger(__name__)

# FAISS threads of the background rebuild: one, so that the queries (index.service_threads)
# and the training workers keep their cores while a new version is built (bench/README.md:
# steps during a rebuild)
BUILD_THREADS = 1

class IndexNotReady(RuntimeError):
    """A search before any index version has been built."""


def shard_rows(n: int, shard: int, shards: int) -> tuple[int, int]:
    """Rows [start, stop) of shard `shard` of `shards` over N rows: contiguous, sizes +-1."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shards")
    return n * shard // shards, n * (shard + 1) // shards


@dataclass(frozen=True)
class _Served:
    """What a query reads: swapped as one reference, never field by field."""

    version: int
    index: faiss.Index
    n: int
    d: int
    build_seconds: float
    description: str
    build_way: str = "kmeans"  # IndexBuilder.last["way"]: flat, lists, assign or kmeans


class IndexHolder:
    """The index versions of one shard plus a background thread that builds the next one.

    store_path: an existing exemplar store (FileNotFoundError otherwise).
    load_latest: start building the newest complete version right away (a restart).
    shard, shards: this holder owns rows shard_rows(N, shard, shards) (default: all rows).
    """

    def __init__(self, store_path: str, cfg: IndexConfig, load_latest: bool = True,
                 shard: int = 0, shards: int = 1, recall_k: int = DEFAULT_RECALL_K):
        self.cfg = cfg
        self.recall_k = recall_k  # the depth the clients search: kind=auto calibrates for it
        self.store = ExemplarStore(store_path)
        self.shard, self.shards = shard, shards
        self.rows = shard_rows(self.store.n, shard, shards)
        if self.rows[1] <= self.rows[0]:
            raise ValueError(f"shard {shard} of {shards} over {self.store.n} exemplars has no "
                             f"rows: use at most {self.store.n} shards")
        # FAISS threads of a query. OpenMP keeps its thread count per calling thread (and
        # torch shares the count in-process), so it is set by each thread that runs FAISS:
        # setting it here would change the constructing thread's torch threads and leave
        # the Ray actor's query threads at the process default
        self._query_threads = max(1, cfg.service_threads)
        # used by the builder thread only: keeps kind=auto's lists and centroids across versions
        self._builder = IndexBuilder(cfg, recall_k=recall_k)
        # version -> _Served; replaced as a whole (never mutated), so a reader sees one dict
        self._held: dict[int, _Served] = {}
        self._committed: Optional[int] = None  # newest version a query named
        self._failed: Optional[int] = None  # version whose build failed last (None: last ok)
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

    def answer(self, queries: np.ndarray, k: int, version: int
               ) -> tuple[Optional[np.ndarray], Optional[np.ndarray], list[int]]:
        """The sharded query: (ids [B, k] global, dists [B, k], ready) from exactly `version`,
        or (None, None, ready) when this shard does not hold it. ready: versions held now.

        Naming v commits it: the versions older than v are dropped (see the module doc).
        """
        held = self._held
        served = held.get(version)
        if served is None:
            return None, None, sorted(held)
        ids, dists = self._search(served, queries, k)
        if self._committed is None or version > self._committed:
            with self._lock:
                if self._committed is None or version > self._committed:
                    self._committed = version
                    self._held = {v: s for v, s in self._held.items() if v >= version}
        with self._lock:
            self._queries += ids.shape[0]
        return ids, dists, sorted(self._held)

    def search(self, queries: np.ndarray, k: int,
               wait_s: float = 60.0) -> tuple[np.ndarray, np.ndarray, int]:
        """ids [B, k] int64, squared distances [B, k] float32, and the version they come from
        (the newest this holder has built).

        queries: [B, d] float32. Leave-one-out is core.candidates' job, on the ranking
        of all N. If no version is loaded yet but one is being built (a fresh or restarted
        service), waits up to wait_s for it.
        """
        served = self._current(wait_s)
        ids, dists = self._search(served, queries, k)
        with self._lock:
            self._queries += ids.shape[0]
        return ids, dists, served.version

    def _search(self, served: _Served, queries: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
        """Global ids [B, k] and dists [B, k] of one held version."""
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != served.d:
            raise ValueError(f"queries must have shape [B, {served.d}] (the latent size of "
                             f"index version {served.version}), got {q.shape}")
        faiss.omp_set_num_threads(self._query_threads)  # this thread's, see __init__
        ids, dists = search(served.index, q, k)
        if self.rows[0]:
            ids = np.where(ids >= 0, ids + self.rows[0], ids)  # local row -> global id
        return ids, dists

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
            if version in self._held or (self._committed or 0) > version:
                return version
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
        """version (newest held), ready (all held), committed, failed_version, shard, shards,
        rows, n, d, kind, build_seconds, build_way, queries_served, building, pending,
        last_error."""
        with self._lock:
            return self._status_locked()

    def close(self, timeout: float = 10.0) -> None:
        """Stops the builder thread (after the build in progress, if any)."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout)

    # -- internals -------------------------------------------------------------------------

    @property
    def _served(self) -> Optional[_Served]:
        """The newest version held (what unnamed queries get), or None."""
        held = self._held
        return held[max(held)] if held else None

    def _version(self) -> Optional[int]:
        served = self._served
        return None if served is None else served.version

    def _status_locked(self) -> dict[str, Any]:
        served = self._served
        return {"shard": self.shard, "shards": self.shards, "rows": list(self.rows),
                "ready": sorted(self._held), "committed": self._committed,
                "failed_version": self._failed,
                "version": None if served is None else served.version,
                "n": None if served is None else served.n,
                "d": None if served is None else served.d,
                "kind": None if served is None else served.description,
                "build_seconds": None if served is None else served.build_seconds,
                "build_way": None if served is None else served.build_way,
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
        # OpenMP's thread count is per calling thread: this one's, for the builds only
        faiss.omp_set_num_threads(BUILD_THREADS)
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
                    # the atomic swap: one reference assignment. Keep the committed version
                    # (clients may still name it until every shard has this one); drop the
                    # other older ones.
                    self._held = {**{v: s for v, s in self._held.items()
                                     if v == self._committed}, served.version: served}
                self._last_error = error
                self._failed = None if error is None else version
                self._building = None
                self._ready.notify_all()

    def _build(self, version: int) -> _Served:
        start = time.perf_counter()
        if self.rows == (0, self.store.n):
            latents = self.store.read_latents(version)
        else:
            latents = self.store.read_latent_rows(version, *self.rows)
        index = self._builder.build(latents)
        seconds = time.perf_counter() - start
        log.info("index version %d (shard %d of %d) built in %.1f s: %s over %d x %d", version,
                 self.shard, self.shards, seconds, describe(index), *latents.shape)
        return _Served(version=version, index=index, n=latents.shape[0], d=latents.shape[1],
                       build_seconds=seconds, description=describe(index),
                       build_way=self._builder.last["way"])


# -- the Ray actor -------------------------------------------------------------------------

class IndexService:
    """Ray actor shell around IndexHolder (start it with start_index_service)."""

    def __init__(self, store_path: str, cfg: dict, shard: int = 0, shards: int = 1,
                 recall_k: int = DEFAULT_RECALL_K):
        logging.basicConfig(level=logging.INFO)
        self._holder = IndexHolder(store_path, IndexConfig(**cfg), load_latest=True,
                                   shard=shard, shards=shards, recall_k=recall_k)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """See IndexHolder.search: (ids [B, k] int64, dists [B, k] float32, version)."""
        return self._holder.search(queries, k)

    def answer(self, queries: np.ndarray, k: int, version: int):
        """See IndexHolder.answer: (ids | None, dists | None, ready versions)."""
        return self._holder.answer(queries, k, version)

    def refresh(self, version: Optional[int] = None) -> int:
        return self._holder.refresh(version)

    def status(self) -> dict[str, Any]:
        """IndexHolder.status plus the Ray node this shard runs on (node_id)."""
        import ray

        return {**self._holder.status(), "node_id": ray.get_runtime_context().get_node_id()}


def start_index_service(store_path: str, cfg: IndexConfig, name: Optional[str] = None,
                        max_concurrency: int = 4, max_restarts: int = -1,
                        recall_k: int = DEFAULT_RECALL_K):
    """Starts one IndexService actor over all rows (Ray must be initialised); returns its handle.

    num_cpus=0 so that it fits beside training workers that hold every CPU; several
    concurrent calls so that queries run while a rebuild does; FAISS gets
    cfg.service_threads OpenMP threads (Ray sets 1 in actors otherwise). Ray restarts it
    after a crash and retries calls that were in flight.
    """
    return _start_shard(store_path, cfg, name, 0, 1, max_concurrency, max_restarts, {},
                        recall_k)


def start_index_shards(store_path: str, cfg: IndexConfig, name: Optional[str] = None,
                       shards: Optional[int] = None, max_concurrency: int = 4,
                       max_restarts: int = -1, recall_k: int = DEFAULT_RECALL_K) -> list:
    """Starts `shards` (default cfg.shards) IndexService actors; returns their handles in
    shard order. Shard s owns rows shard_rows(N, s, S); actor names are `name` for one
    shard, `name-shard<s>` for several. recall_k: the depth the clients search, which
    kind=auto's IVF is calibrated for.

    On a cluster of several nodes the shards go into a placement group with the SPREAD
    strategy, one bundle per shard, so that they land on different nodes while there are
    nodes enough (SPREAD is soft: after a node is lost, its bundle and shard are placed on a
    node that is left). On one node they simply share it.
    """
    import ray

    shards = cfg.shards if shards is None else shards
    if shards < 1:
        raise ValueError(f"index.shards must be >= 1, got {shards}")
    n = ExemplarStore(store_path).n
    if shards > n:
        raise ValueError(f"index.shards={shards} is more than the {n} exemplars")
    group = None
    if shards > 1 and placement_strategy() == "SPREAD":
        from ray.util.placement_group import placement_group

        # a bundle must reserve something: 1 MiB of Ray's logical `memory`, never a CPU,
        # so that the shards never take a CPU the training workers need
        group = placement_group([{"memory": _BUNDLE_MEMORY}] * shards, strategy="SPREAD")
        ray.get(group.ready(), timeout=120)
    handles = []
    for s in range(shards):
        extra = {}
        if group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            extra = {"memory": _BUNDLE_MEMORY,
                     "scheduling_strategy": PlacementGroupSchedulingStrategy(
                         group, placement_group_bundle_index=s)}
        handles.append(_start_shard(store_path, cfg, name if shards == 1 or not name
                                    else f"{name}-shard{s}", s, shards, max_concurrency,
                                    max_restarts, extra, recall_k))
    return handles


_BUNDLE_MEMORY = 1 << 20


def placement_strategy() -> str:
    """"SPREAD" when the Ray cluster has several live nodes, else "PACK" (Ray must be up):
    how index shards (and, through the driver's hook, training workers) are placed."""
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    return "SPREAD" if len(alive) > 1 else "PACK"


def _start_shard(store_path, cfg: IndexConfig, name, shard, shards, max_concurrency,
                 max_restarts, extra: dict, recall_k: int):
    import ray  # the only Ray import: everything above works without it

    ExemplarStore(store_path)  # fail here, in the caller, if the store does not exist
    threads = str(max(1, cfg.service_threads))
    options = dict(name=name, num_cpus=0, max_concurrency=max_concurrency,
                   max_restarts=max_restarts, max_task_retries=3,
                   runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}})
    options.update(extra)
    actor = ray.remote(IndexService).options(**options)
    return actor.remote(str(store_path), dataclasses.asdict(cfg), shard, shards, recall_k)
