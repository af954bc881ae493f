"""Refreshes on separate encoder actors (index.refresh_workers), as REALM's and ANCE's index
builders run beside the trainer: training does not stop while the N exemplars are encoded.

    rank 0, mid-epoch refresh:  claim version v, ray.put(a CPU copy of the encoder weights),
                                each RefreshEncoder encodes its rows of the store into v
    every later step (rank 0):  BackgroundRefresh.poll() -- once all encoders are done:
                                mark v complete, ask the index service to build it

Only one background version is in flight at a time (a refresh asked for meanwhile is
skipped and counted). The epoch-end refresh stays on the training workers and synchronous,
because validation needs the latents of the current weights; it first waits for a version
still in flight, so versions complete in the order they were claimed.

The encoders need spare CPUs (or GPUs): on a machine whose cores the training workers
already use, they slow training down by as much as they take (bench/README.md).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import config as config_mod
from ..core.objective import build_model
from ..retrieval.store import ExemplarStore
from .refresh import KEEP_VERSIONS, encode_into_version
from .store_images import StoreImages

log = logging.getLogger(__name__)


class RefreshEncoder:
    """A Ray actor (wrapped by start_refresh_encoders) that encodes rows [start, stop) of the
    store into a latent version with a snapshot of the encoder's weights: rows are read and
    written a block at a time, so its memory does not grow with N."""

    def __init__(self, store_path: str, config: dict, image_shape, worker: int, workers: int,
                 threads: int = 1):
        cfg = config_mod.from_dict(config)
        torch.set_num_threads(max(1, threads))
        self.store = ExemplarStore(store_path)
        self.images = StoreImages(self.store, cache_bytes=0)
        self.model = build_model(cfg, tuple(image_shape)).eval()
        # chunk-aligned rows (encoders never share a chunk), written whole chunks at a time
        self.start, self.stop = self.store.row_range(worker, workers)

    def rows(self) -> tuple[int, int]:
        """The rows [start, stop) this encoder writes."""
        return self.start, self.stop

    def encode(self, weights: dict, version: int) -> int:
        """Encodes this encoder's rows into `version` with `weights` (the state dict of the
        model's net); returns the number of rows written."""
        self.model.net.load_state_dict(weights)
        encode_into_version(self.store, version, self.model.net, self.images, self.start,
                            self.stop)
        return self.stop - self.start


def start_refresh_encoders(store_path: str, config: dict, image_shape, workers: int,
                           cpus: float) -> list:
    """`workers` RefreshEncoder actors over contiguous, chunk-aligned row ranges."""
    import ray

    actor = ray.remote(RefreshEncoder)
    encoders = [actor.options(num_cpus=cpus).remote(store_path, config, list(image_shape), i,
                                                    workers, max(1, int(cpus)))
                for i in range(workers)]
    # started before the first step: an encoder that cannot start (its store, its model)
    # fails the run's start, and the first mid-epoch refresh does not wait for a process
    # to import torch (a short epoch could end before it was served)
    ranges = ray.get([e.rows.remote() for e in encoders])
    log.info("%d refresh encoders started over rows %s", workers, ranges)
    return encoders


class BackgroundRefresh:
    """Rank 0's side of the encoder actors: launch a version, poll for its completion."""

    def __init__(self, encoders: list, store: ExemplarStore, service,
                 keep_versions: int = KEEP_VERSIONS):
        self.encoders, self.store, self.service = encoders, store, service
        self.keep_versions = keep_versions
        self.pending: Optional[tuple[int, int, list]] = None  # (version, step, futures)
        self.skipped = 0  # refreshes asked for while one was in flight

    def launch(self, version: int, net_state: dict, step: int) -> None:
        import ray

        weights = ray.put({k: v.detach().cpu() for k, v in net_state.items()})
        self.pending = (version, step, [e.encode.remote(weights, version)
                                        for e in self.encoders])

    def poll(self, wait: bool = False) -> Optional[tuple[int, int]]:
        """(version, step it was encoded at) once the version in flight is complete and
        handed to the index service, else None; wait=True blocks until then."""
        import ray

        if self.pending is None:
            return None
        version, step, futures = self.pending
        ready, _ = ray.wait(futures, num_returns=len(futures), timeout=None if wait else 0)
        if len(ready) < len(futures):
            return None
        ray.get(futures)  # an encoder's error surfaces here, in the training run
        self.pending = None
        self.store.mark_complete(version, keep=self.keep_versions)
        if self.service is not None:
            self.service.refresh(version)
        log.info("latent version %d (encoded by %d refresh actors from the weights of step %d) "
                 "complete", version, len(self.encoders), step)
        return version, step
