"""The exemplar cache of both trainers: the encoder means of all N exemplars, refreshed by
every rank, and the search the RAT sampler asks: "the k nearest among this step's subset S".

Where the means live and where the search runs is placement, chosen by the trainer
(`placement()`), not a second code path:

- "worker": every rank encodes its share of the rows, the shares are gathered so that every
  rank holds all N means, and an exact torch search answers in the process
  (core/exact.py). The one-process trainer, and Ray workers whenever the index would
  be the exact one anyway (index.kind=auto below index.auto_exact_below, one shard): no
  actor round trip per step, and the same steps as the one-process trainer.
- "actors": every rank writes its rows into a latent version of the exemplar store
  (`versions`, train/refresh.LatentRefresh), the sharded FAISS index actors build and serve
  it while training goes on, and the search asks them (`index`,
  train/service_client.ShardedSearch): the regime where the means or the index do not fit a
  worker, or where index.shards asks for actors.

Pure torch: the store and the actors come in as objects.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import torch

from .group import Group
from .objective import encode_means
from .exact import TorchExactSearch

log = logging.getLogger(__name__)

WORKER, ACTORS = "worker", "actors"


def placement(index_cfg, n: int, rat: bool) -> str:
    """Where a run's exemplar latents live and are searched (see the module docstring):
    in the worker where index.kind=auto would build the exact index anyway (fewer than
    index.auto_exact_below exemplars: 8 MB of means at N = 50,000) and nothing asks for
    actors (index.shards, index.refresh_workers, index.use_gpu, an explicit index.kind)."""
    small = n < index_cfg.auto_exact_below
    if not rat:
        return WORKER if small else ACTORS  # no index: the means only
    in_worker = (small and index_cfg.kind == "auto" and index_cfg.shards == 1
                 and not index_cfg.refresh_workers and not index_cfg.use_gpu)
    return WORKER if in_worker else ACTORS


class ExemplarCache:
    """loop.ExemplarCache: the latents behind the exemplar prior and their neighbour search.

    images:   the exemplar images [N, D]: uint8 grey levels (a tensor, or
              train/store_images.StoreImages), or a float tensor of images that are not
              255 levels
    group:    the process group (every rank calls start and refresh)
    rat:      whether the sampler searches (prior.rat); else only the means are kept
    versions: placement "actors": the store's latent versions (LatentRefresh), else None
    index:    placement "actors" with RAT: the index actors' search (ShardedSearch)
    background_refresh: placement "actors": mid-epoch refreshes go to encoder actors and
              complete between steps (index.refresh_workers)
    serve_every_version: placement "actors": wait after every refresh until the actors
              serve the new version, so that steps search exactly what the worker placement
              would (deterministic, for tests that compare the two); by default only the
              first version is waited for and later ones are swapped in while training goes on
    """

    def __init__(self, images, group: Group = Group(), rat: bool = True, versions=None,
                 index=None, build_timeout_s: float = 300.0, background_refresh: bool = False,
                 serve_every_version: bool = False):
        self.images = images
        self.group = group
        self.placement = ACTORS if versions is not None else WORKER
        self._versions = versions
        if self.placement == WORKER:
            self._search: Any = TorchExactSearch() if rat else None
        else:
            self._search = index if rat else None
        self.background = background_refresh and self._search is not None
        self.build_timeout_s = build_timeout_s  # the first build has no older one to serve
        self._served = self._search is None or self.placement == WORKER
        self.serve_every_version = serve_every_version and not self._served
        self._latents: Optional[torch.Tensor] = None
        self._latest: Optional[int] = None
        self.built_at: dict[int, int] = {}  # version -> step whose weights encoded it
        self._resumed: Optional[tuple[int, int]] = None  # (version, step) to encode again

    @property
    def searches(self) -> bool:
        return self._search is not None

    @property
    def latest(self) -> Optional[int]:
        """The newest version written (served at once in the worker, soon by the actors)."""
        return self._versions.latest if self._versions is not None else self._latest

    # -- the loop's side -------------------------------------------------------------------

    def start(self, saved: Optional[dict], step: int) -> bool:
        """Agrees on versions (every rank); True when the checkpoint's version is reused as
        it is (actors: still the newest complete one in the store), False when the caller
        must refresh. In the worker nothing persists but the number: the first refresh
        encodes the checkpoint's weights again under the same version."""
        saved = saved or {}
        # "store_version" is what Ray checkpoints of earlier releases recorded
        version = saved.get("cache_version", saved.get("store_version"))
        built = saved.get("cache_version_step", saved.get("store_version_step", step))
        if self._versions is None:
            if version is not None:
                self._resumed = (int(version), int(built))
            return False
        reused = self._versions.start(version, built)
        if reused is not None:
            self._wait_served(reused)
        return reused is not None

    def refresh(self, net, step: int, background: bool = False) -> None:
        """Re-encodes all exemplars with `net` into a new version (every rank calls it)."""
        if self._versions is not None:
            if background and self.background:
                self._versions.publish_background(net, step)  # rank 0 only; returns at once
                return
            self._wait_served(self._versions.publish(net, step))
            return
        start, stop = self.group.share(len(self.images))
        mine = encode_means(net, self._levels(start, stop))
        self._latents = self.group.gather_rows(mine, len(self.images))
        version, built = self._resumed or ((self._latest or 0) + 1, step)
        self._resumed = None
        if self._search is not None:
            self._search.update(self._latents, version)  # answers name their version
        self._latest, self.built_at = version, {version: built}

    def _levels(self, start: int, stop: int) -> torch.Tensor:
        """Exemplar rows [start, stop) as uint8 grey levels, which encode_means encodes
        with the int8 image layer (core/int8.py), from a store reader (`bytes`) or a uint8
        tensor; a float tensor (images that are not 255 levels) is passed as it is."""
        if hasattr(self.images, "bytes"):  # train/store_images.StoreImages
            return torch.from_numpy(self.images.bytes(slice(start, stop)))
        return self.images[start:stop]

    def search(self, queries: np.ndarray, k: int, among=None) -> tuple[np.ndarray, int]:
        """step.NeighbourSearch: the k nearest among `among` (a keyed.StepSubset)."""
        if self.background:
            self._versions.poll()  # rank 0 completes a version the encoder actors finished
        return self._search.search(queries, k, among=among)

    def centres(self):
        """[N, d] means of the newest version (validation, sample grids): a tensor, or
        StoreLatents read block by block when N of them should not be held at once."""
        if self._versions is not None:
            return self._versions.centres()
        return self._latents

    def state(self) -> dict:
        """What a checkpoint records to reuse or re-encode the newest version on resume."""
        version = self.latest
        built = (self._versions.built_at if self._versions is not None else self.built_at)
        return {"cache_version": version, "cache_version_step": built.get(version, 0)}

    def staleness(self, version: int, step: int) -> int:
        """Steps since `version` was encoded (0 for an unknown one)."""
        built = self._versions.built_at if self._versions is not None else self.built_at
        return step - built.get(version, step)

    def step_metrics(self) -> dict:
        out = {}
        if self.placement == ACTORS and self._search is not None:
            out["search_retries"] = self._search.retried
        background = getattr(self._versions, "background", None)
        if background is not None:
            out["refreshes_skipped"] = background.skipped
        return out

    def _wait_served(self, version: int) -> None:
        """The first version must be served by the actors before any search (rank 0 waits,
        then a barrier); later ones are swapped in while training goes on."""
        if self._served and not self.serve_every_version:
            return
        if self.group.rank == 0:  # fails at once when the service reports a failed build
            self._search.wait_served(version, timeout=self.build_timeout_s)
        self.group.barrier()
        self._served = True
