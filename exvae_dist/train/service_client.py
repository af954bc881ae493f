"""The workers' side of the index service: retried calls and the NeighbourSearch adapter
over one or several index shards (ShardedSearch; ServiceSearch is the same class).

The service actor restarts itself after a crash (retrieval/service.py) and reloads the newest
complete latent version from the store; meanwhile calls fail with RayActorError or
ActorUnavailableError. A worker retries those with a short, growing backoff, so an index
crash costs a few seconds of training, never the run.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

log = logging.getLogger(__name__)

# An ActorDiedError is a RayActorError; ActorUnavailableError is raised while the actor is
# restarting or unreachable for a moment.
_TRANSIENT = (RayActorError, ActorUnavailableError)
# Retries of a call to a dead / restarting index actor, the backoff 0.2 s doubling to 2 s:
# ~15 s in all, longer than an actor restart takes, short enough that a service that is
# gone for good fails the step (and Ray Train restarts the workers) instead of hanging
RETRIES = 10


def call_with_retry(call: Callable[[], "ray.ObjectRef"], what: str, retries: int = RETRIES,
                    backoff_s: float = 0.2, max_backoff_s: float = 2.0) -> Any:
    """ray.get(call()), calling again after actor death / unavailability, up to `retries` times.

    `call` makes a fresh remote call each time (a ref of a failed call stays failed).
    """
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return ray.get(call())
        except _TRANSIENT as err:
            if attempt == retries:
                raise RuntimeError(
                    f"the index service did not answer {what} after {retries} retries "
                    f"({type(err).__name__}); check its actor in `ray list actors` and its "
                    f"log for why it keeps dying") from err
            log.warning("index service unavailable during %s (%s); retry %d/%d in %.1f s",
                        what, type(err).__name__, attempt + 1, retries, delay)
            time.sleep(delay)
            delay = min(max_backoff_s, 2 * delay)


class ShardedSearch:
    """step.NeighbourSearch over S IndexService shards (one handle works too):
    search(queries [B, d], k) -> (ids [B, k] int64 global, nearest first, index version).

    Each batch goes to every shard in parallel, naming ONE version v; every shard answers
    from exactly v and the k nearest of the S answers are merged (index.merge_topk), so an
    answer never mixes versions. v is the newest version that every shard reported ready
    (each reply carries the shard's ready versions); the client moves to a newer one only
    once all shards hold it, and shards keep the version named last until then (see
    retrieval/service.py). Leave-one-out is left to core.candidates, as with
    the in-memory search.

    A dead or restarting shard (Ray restarts it; it reloads its rows of the newest complete
    version) makes the search wait and retry, up to timeout_s; then a TimeoutError names the
    shard and its last status. `retried` counts retry rounds (logged as a metric).
    """

    def __init__(self, handles, retries: int = RETRIES, timeout_s: float = 300.0,
                 poll_s: float = 0.1, safety: float = 2.0):
        self.handles = list(handles) if isinstance(handles, (list, tuple)) else [handles]
        if not self.handles:
            raise ValueError("ShardedSearch needs at least one index shard handle")
        self.retries = retries
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.safety = safety  # prior.safety: how deep a search among a subset goes
        self.version: Optional[int] = None  # the version queries name; None until known
        self.retried = 0

    # -- NeighbourSearch -------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, among=None) -> tuple[np.ndarray, int]:
        """The k nearest of each query among `among` (a keyed.StepSubset; None: all N). The
        index holds all N, so it is searched k' = query_depth(k, N, M, safety) deep and S's
        members are kept, the first k of them (-1 where a row found fewer)."""
        from ..core.candidates import nearest_members

        def search_all(q: np.ndarray, depth: int) -> tuple[np.ndarray, int]:
            ids, _dists, version = self.search_with_distances(q, depth)
            return ids, version

        if among is None:
            return search_all(queries, k)
        return nearest_members(search_all, queries, k, among, self.safety)

    def search_with_distances(self, queries: np.ndarray, k: int
                              ) -> tuple[np.ndarray, np.ndarray, int]:
        """ids [B, k] int64, squared distances [B, k] float32, and the one version used."""
        from ..retrieval.index import merge_topk

        q = np.ascontiguousarray(queries, dtype=np.float32)
        ref = ray.put(q) if len(self.handles) > 1 else q  # one copy for all shards
        deadline = time.monotonic() + self.timeout_s
        problem = "no version is ready on every shard yet"
        while True:
            if self.version is not None:
                version = self.version
                refs = [h.answer.remote(ref, k, version) for h in self.handles]
                replies, problem = self._gather(refs)
                if problem is None:
                    readies = [r[2] for r in replies]
                    if all(r[0] is not None for r in replies):
                        self._advance(readies)
                        ids, dists = merge_topk([r[0] for r in replies],
                                                [r[1] for r in replies], k)
                        return ids, dists, version
                    self._advance(readies, allow_older=True)
                    problem = f"version {version} is not held by every shard (ready: {readies})"
            else:
                problem = self._sync() or problem
                if self.version is not None:
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"index search got no answer from all {len(self.handles)} shards within "
                    f"{self.timeout_s} s: {problem}; status: {self._statuses_or_errors()}. "
                    f"Check the shard actors (`ray list actors`) or raise "
                    f"index.query_timeout_s")
            self.retried += 1
            time.sleep(self.poll_s)

    # -- versions --------------------------------------------------------------------------

    def refresh(self, version: int) -> int:
        """Asks every shard to build `version` in the background; returns at once (after
        every shard accepted it: a version that is not complete raises here)."""
        refs = [h.refresh.remote(version) for h in self.handles]  # all at once
        out = []
        for i, (h, r) in enumerate(zip(self.handles, refs)):
            try:
                out.append(ray.get(r))
            except _TRANSIENT:  # a shard restarting: ask again once it is back
                out.append(call_with_retry(lambda h=h: h.refresh.remote(version),
                                           f"refresh (shard {i})", self.retries))
        return min(out)

    def wait_served(self, version: int, timeout: float = 300.0) -> dict:
        """Blocks until every shard holds `version` or a newer common one; returns status().

        Fails AT ONCE with the shard's last_error when a shard's build of `version` (or of a
        newer one it was asked for) failed and it is building nothing newer; TimeoutError
        with every shard's status after `timeout` otherwise.
        """
        deadline = time.monotonic() + timeout
        while True:
            statuses = self._statuses_or_errors()
            ok = [s for s in statuses if isinstance(s, dict)]
            if len(ok) == len(statuses):
                common = _newest_common([s["ready"] for s in ok])
                if common is not None and common >= version:
                    self.version = max(self.version or 0, common)
                    return self._merged(ok)
                for s in ok:
                    failed = s.get("failed_version")
                    newer_coming = max(v for v in (s.get("building_version"), s.get("pending"),
                                                   max(s["ready"], default=0), 0)
                                       if v is not None) >= version
                    if failed is not None and failed >= version and not newer_coming:
                        raise RuntimeError(f"index shard {s['shard']} of {s['shards']} failed "
                                           f"to build version {failed}: {s['last_error']}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"index version {version} not served by every shard within "
                                   f"{timeout} s; shard status: {statuses}")
            time.sleep(0.05)

    def status(self) -> dict:
        """The shards' statuses merged: version (the newest common ready one, what the next
        search names), n, queries_served, last_error (the first shard's), shards: [each]."""
        statuses = [call_with_retry(lambda h=h: h.status.remote(), "status", self.retries)
                    for h in self.handles]
        return self._merged(statuses)

    # -- internals -------------------------------------------------------------------------

    def _merged(self, statuses: list[dict]) -> dict:
        errors = [s["last_error"] for s in statuses if s.get("last_error")]
        return {"version": _newest_common([s["ready"] for s in statuses]),
                "n": sum(s["n"] or 0 for s in statuses),
                "queries_served": sum(s["queries_served"] for s in statuses),
                "last_error": errors[0] if errors else None,
                "kind": statuses[0].get("kind"), "shards": statuses}

    def _advance(self, readies: list[list[int]], allow_older: bool = False) -> None:
        common = _newest_common(readies)
        if common is None:
            if allow_older:
                self.version = None  # re-learn from statuses (and ask for a common one)
            return
        if allow_older or common > (self.version or 0):
            self.version = common

    def _sync(self) -> Optional[str]:
        """Learns the newest common version from the shards' statuses; when none is common,
        asks every shard for the newest one any shard holds. Returns a problem or None."""
        statuses = self._statuses_or_errors()
        bad = [f"shard {i}: {s}" for i, s in enumerate(statuses) if not isinstance(s, dict)]
        if bad:
            return "; ".join(bad)
        readies = [s["ready"] for s in statuses]
        common = _newest_common(readies)
        if common is not None:
            self.version = common
            return None
        newest = max((v for r in readies for v in r), default=None)
        if newest is not None:
            for h in self.handles:  # a restarted shard holds only the newest complete one
                h.refresh.remote(newest)
        return f"no version is held by every shard (ready: {readies})"

    def _gather(self, refs) -> tuple[list, Optional[str]]:
        replies, problem = [], None
        for i, r in enumerate(refs):
            try:
                replies.append(ray.get(r))
            except _TRANSIENT as err:
                problem = f"shard {i} unavailable ({type(err).__name__})"
                replies.append(None)
        return replies, problem

    def _statuses_or_errors(self) -> list:
        out = []
        for i, h in enumerate(self.handles):
            try:
                out.append(ray.get(h.status.remote(), timeout=30))
            except (*_TRANSIENT, ray.exceptions.GetTimeoutError) as err:
                out.append(f"unavailable ({type(err).__name__})")
        return out


def _newest_common(readies: list[list[int]]) -> Optional[int]:
    common = set(readies[0]) if readies else set()
    for r in readies[1:]:
        common &= set(r)
    return max(common) if common else None


# The one-actor adapter of before: a ShardedSearch over one handle (same protocol).
ServiceSearch = ShardedSearch
