"""The workers' side of the index service: retried calls and the NeighbourSearch adapter.

The service actor restarts itself after a crash (retrieval/service.py) and reloads the newest
complete latent version from the store; meanwhile calls fail with RayActorError or
ActorUnavailableError. A worker retries those with a short, growing backoff, so an index
crash costs a few seconds of training, never the run.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

log = logging.getLogger(__name__)

# An ActorDiedError is a RayActorError; ActorUnavailableError is raised while the actor is
# restarting or unreachable for a moment.
_TRANSIENT = (RayActorError, ActorUnavailableError)


def call_with_retry(call: Callable[[], "ray.ObjectRef"], what: str, retries: int = 10,
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
                    f"({type(err).__name__}); check its actor in `ray list actors` or raise "
                    f"ray.search_retries") from err
            log.warning("index service unavailable during %s (%s); retry %d/%d in %.1f s",
                        what, type(err).__name__, attempt + 1, retries, delay)
            time.sleep(delay)
            delay = min(max_backoff_s, 2 * delay)


class ServiceSearch:
    """step.NeighbourSearch over the IndexService actor: search(queries [B, d], k) ->
    (ids [B, k] int64 nearest first, index version). Leave-one-out is left to
    retrieval.candidates (exactly as with TorchExactSearch), so no exclude_ids are sent.
    """

    def __init__(self, handle, retries: int = 10):
        self.handle = handle
        self.retries = retries
        self.retried = 0  # retry attempts so far (logged as a metric)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        first = True

        def call():
            nonlocal first
            if not first:
                self.retried += 1
            first = False
            return self.handle.search.remote(q, k)

        ids, _dists, version = call_with_retry(call, "search", self.retries)
        return np.asarray(ids, dtype=np.int64), int(version)

    def refresh(self, version: int) -> int:
        """Asks the service to build `version` in the background; returns at once."""
        return call_with_retry(lambda: self.handle.refresh.remote(version), "refresh",
                               self.retries)

    def status(self) -> dict:
        return call_with_retry(lambda: self.handle.status.remote(), "status", self.retries)
