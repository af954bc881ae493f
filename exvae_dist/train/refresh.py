"""The refresh pass: a new version of the exemplar-latent cache, written by every rank.

    rank 0: store.begin_version(v)                  -- barrier --
    rank r: encode rows store.row_range(r, W) without gradients, store.write_rows(v, ...)
                                                    -- barrier --
    rank 0: store.mark_complete(v); service.refresh(v)   (returns at once)
                                                    -- barrier --

The service then builds the index of v in a background thread and keeps answering from the
version it serves, so training goes on while it builds. Each rank remembers at which step
every version was encoded, to log how stale the version in use is.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from ..core.models import LatentVariableModel
from ..core.objective import encode_means
from ..retrieval.store import ExemplarStore
from ..core.group import Group
from .store_images import StoreImages

log = logging.getLogger(__name__)


def encode_into_version(store: ExemplarStore, version: int, net: LatentVariableModel,
                        images, start: int, stop: int, block_rows: int = 8192,
                        batch_size: int = 2000,
                        device: torch.device = torch.device("cpu")) -> None:
    """Encodes exemplar rows [start, stop) of `images` (StoreImages) with `net`, no
    gradients, and writes them into latent `version`: rows in, latents out, one block of
    ~block_rows (a whole number of store chunks) at a time, so memory stays one block
    whatever N is. The refresh of the training workers, the encoder actors and bench_scale
    all write versions this way."""
    block = store.chunk_rows * max(1, block_rows // store.chunk_rows)
    for a in range(start, stop, block):
        b = min(stop, a + block)
        # uint8 levels (a block is ~6 MB): encode_means runs the image layer in int8 where
        # the CPU can, its int8 weights made once per block
        x = torch.from_numpy(images.bytes(slice(a, b))).to(device)
        store.write_rows(version, a, encode_means(net, x, batch_size).float().cpu().numpy())


# Complete latent versions kept in the store: the newest (the index is building it), the
# one the index serves until then, and the one before, which a client that has not seen the
# last swap may still name; an older one is N x d floats that nothing reads, so it goes
KEEP_VERSIONS = 3


class LatentRefresh:
    """Writes latent versions of the exemplar cache from all ranks; rank 0 publishes them.

    store:   the run's ExemplarStore (every rank opens the same path)
    images:  the exemplar images (StoreImages: rows of the store, read a batch at a time, so the
             pass streams: rows in, latents out, memory bounded whatever N is)
    service: a ServiceSearch (or None when no index is served, e.g. the exact prior)
    """

    def __init__(self, store: ExemplarStore, images: StoreImages, group: Group,
                 service=None, keep_versions: int = KEEP_VERSIONS, batch_size: int = 2000,
                 device: torch.device = torch.device("cpu"), resident_bytes: int = 512 << 20,
                 background=None):
        if len(images) != store.n:
            raise ValueError(f"{len(images)} images for a store of {store.n} exemplars")
        self.store = store
        self.images = images
        self.group = group
        self.service = service
        self.keep_versions = keep_versions
        self.batch_size = batch_size
        self.device = device
        self.resident_bytes = resident_bytes
        # refresh_actors.BackgroundRefresh on rank 0 when index.refresh_workers > 0
        self.background = background if group.rank == 0 else None
        self.rows = store.row_range(group.rank, group.world)
        self.built_at: dict[int, int] = {}  # version -> step whose model encoded it
        self.latest: Optional[int] = None  # newest version written (and asked of the service)
        self._next: Optional[int] = None

    def start(self, resume_version: Optional[int] = None, resume_step: int = 0) -> Optional[int]:
        """Agrees on version numbers across ranks; returns a version to reuse, or None.

        On resume, the checkpoint's version is reused when it is still the newest complete
        one (it was encoded by the very model state the checkpoint holds); otherwise the
        caller must publish a fresh one. New versions always go above every existing one,
        complete or not: complete versions are immutable.
        """
        newest, reuse = 0, 0
        if self.group.rank == 0:
            versions = self.store.versions()
            newest = max(versions, default=0)
            if resume_version is not None and self.store.latest_complete() == resume_version:
                reuse = resume_version
        self._next = self.group.broadcast_int(newest) + 1
        reuse = self.group.broadcast_int(reuse)
        if not reuse:
            return None
        self.built_at[reuse] = resume_step
        self.latest = reuse
        if self.group.rank == 0 and self.service is not None:
            self.service.refresh(reuse)  # a no-op when a restarted service already has it
        return reuse

    def publish_background(self, net: LatentVariableModel, step: int) -> None:
        """Rank 0 hands a new version to the encoder actors and returns at once (poll()
        completes it); other ranks do nothing. Skipped while a version is in flight."""
        if self.background is None:
            return
        if self.background.pending is not None:
            self.background.skipped += 1
            return
        version = self.store.claim_version(self._next)
        self._next = version + 1
        self.background.launch(version, net.state_dict(), step)

    def poll(self) -> None:
        """Rank 0: completes a background version whose encoders are done (cheap otherwise)."""
        if self.background is not None:
            self._completed(self.background.poll())

    def _completed(self, done) -> None:
        if done is not None:
            version, step = done
            self.built_at[version] = step
            self.latest = version

    def publish(self, net: LatentVariableModel, step: int) -> int:
        """Encodes this rank's rows with `net` into a new version; every rank returns it.

        When it returns, the version is complete in the store on every rank, and the
        service has been asked to build it. A background version still in flight is
        completed first, so versions complete in the order they were claimed.
        """
        if self._next is None:
            raise RuntimeError("call start() before publish(): ranks must agree on versions")
        if self.background is not None:
            self._completed(self.background.poll(wait=True))
        version = self._next
        if self.group.rank == 0:
            version = self.store.claim_version(version)  # atomic claim
        version = self.group.broadcast_int(version)  # rank 0's claimed number
        self._next = version + 1
        self.group.barrier()
        encode_into_version(self.store, version, net, self.images, *self.rows,
                            block_rows=4 * self.batch_size, batch_size=self.batch_size,
                            device=self.device)
        self.group.barrier()
        if self.group.rank == 0:
            self.store.mark_complete(version, keep=self.keep_versions)
            if self.service is not None:
                self.service.refresh(version)
        self.group.barrier()
        self.built_at[version] = step
        self.latest = version
        log.debug("rank %d: latent version %d published at step %d", self.group.rank,
                  version, step)
        return version

    def centres(self, version: Optional[int] = None):
        """All N exemplar means of a complete version (default: the newest written): a [N, d]
        tensor when it fits in resident_bytes, else StoreLatents (read block by block)."""
        version = self.latest if version is None else version
        if version is None:
            raise RuntimeError("no latent version written yet")
        if self.store.n * self.store.latent_dim * 4 > self.resident_bytes:
            return StoreLatents(self.store, version)
        return torch.from_numpy(self.store.read_latents(version))

    def staleness(self, version: int, step: int) -> int:
        """Steps since `version` was encoded (0 for an unknown version, e.g. -1)."""
        return step - self.built_at.get(version, step)


class StoreLatents:
    """priors.CentreBlocks over one complete latent version in the store: the validation
    pass and the sample grids over all N exemplar means, holding one block at a time."""

    def __init__(self, store: ExemplarStore, version: int, block_rows: int = 1 << 16,
                 device: torch.device = torch.device("cpu")):
        self.store, self.version, self.block_rows = store, version, block_rows
        self.shape = (store.n, store.latent_dim)
        self.device = torch.device(device)

    def to(self, device) -> "StoreLatents":
        return StoreLatents(self.store, self.version, self.block_rows, device)

    def blocks(self):
        for start in range(0, self.shape[0], self.block_rows):
            stop = min(self.shape[0], start + self.block_rows)
            rows = self.store.read_latent_rows(self.version, start, stop)
            yield torch.from_numpy(rows).to(self.device)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()
        rows = [self.store.read_latent_rows(self.version, i, i + 1) for i in ids.tolist()]
        out = np.concatenate(rows) if rows else np.empty((0, self.shape[1]), np.float32)
        return torch.from_numpy(out).to(self.device)
