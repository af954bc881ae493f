"""The Ray Train worker: a shell around loop.fit, run by every rank of a TorchTrainer.

It builds the loop's parts from what Ray gives it: the process group and device, the model in
DDP, the exemplar images read from the store by id (StoreImages: bounded memory), a latent cache written by every rank into the store and
searched through the index service (`StoreCache`), and Ray Train checkpoints (`RaySink`).
`train.batch_size` is the GLOBAL batch: every rank takes its slice of each global batch, so a
run trains on the same batches and coins whatever the number of workers (loop.py).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import config as config_mod
from ..runs.checkpoint import (BEST, LATEST, first_readable, load_checkpoint,
                               ray_resume_candidates, save_checkpoint)
from ..core.group import Group
from ..core.loop import Parts, fit
from ..core.objective import build_model
from ..retrieval.store import ExemplarStore
from ..runs.tracking import make_tracker
from ..retrieval.exemplar_images import from_bytes
from .refresh import LatentRefresh
from .service_client import ShardedSearch
from .store_images import StoreImages

log = logging.getLogger(__name__)

class StoreCache:
    """loop.ExemplarCache on Ray: versions of the latent table in the Zarr store, written by
    every rank (LatentRefresh), and the index service that serves them (None for the exact
    prior, which only needs the centres)."""

    def __init__(self, refresh: LatentRefresh, service: Optional[ShardedSearch], group: Group,
                 wait_for_refresh: bool = False, build_timeout_s: float = 300.0,
                 background: bool = False):
        self._refresh = refresh
        self.images = refresh.images
        self.search = service
        # index.refresh_workers > 0: mid-epoch refreshes go to the encoder actors, and rank 0
        # completes them between steps (PollingSearch polls before each search)
        self.background = background and service is not None
        if self.background:
            self.search = PollingSearch(service, refresh.poll)
        self.group = group
        self.wait_for_refresh = wait_for_refresh and service is not None
        self._served = service is None  # the first version must be served before a search
        self.build_timeout_s = build_timeout_s  # the first build has no older one to serve

    @property
    def latest(self) -> Optional[int]:
        return self._refresh.latest

    def start(self, saved: Optional[dict], step: int) -> bool:
        saved = saved or {}
        version = self._refresh.start(saved.get("store_version"),
                                      saved.get("store_version_step", step))
        if version is not None:
            self._wait_first(version)
        return version is not None

    def refresh(self, net, step: int, background: bool = False) -> None:
        if background and self.background:
            self._refresh.publish_background(net, step)  # rank 0 only; returns at once
            return
        self._wait_first(self._refresh.publish(net, step))

    def _wait_first(self, version: int) -> None:
        """Waits (rank 0, then a barrier) until `version` is served: always for the first
        version, for every version with index.wait_for_refresh."""
        if self._served and not self.wait_for_refresh:
            return
        if self.group.rank == 0:  # fails at once when the service reports a failed build
            self.search.wait_served(version, timeout=self.build_timeout_s)
        self.group.barrier()
        self._served = True

    def centres(self) -> torch.Tensor:
        return self._refresh.centres()

    def state(self) -> dict:
        version = self._refresh.latest
        return {"store_version": version,
                "store_version_step": self._refresh.built_at.get(version, 0)}

    def staleness(self, version: int, step: int) -> int:
        return self._refresh.staleness(version, step)

    def step_metrics(self) -> dict:
        out = {"search_retries": self.search.retried} if self.search is not None else {}
        if self._refresh.background is not None:
            out["refreshes_skipped"] = self._refresh.background.skipped
        return out


class PollingSearch:
    """The index search with a poll before each query: where rank 0 completes a version the
    encoder actors have finished (the step does not wait for them)."""

    searches_subsets = False  # search() takes no among= (not forwarded by __getattr__)

    def __init__(self, search: ShardedSearch, poll):
        self._search, self._poll = search, poll

    def search(self, queries, k: int):
        self._poll()
        return self._search.search(queries, k)

    def __getattr__(self, name):  # wait_served, retried, ... of the wrapped search
        return getattr(self._search, name)


class RaySink:
    """loop.CheckpointSink on Ray: rank 0 writes the state into a Ray Train checkpoint (and
    checkpoint.pt / best.pt into the run folder, for `evaluate` and `--no-ray`); every rank
    reports, since ray.train.report is a barrier across ranks."""

    def __init__(self, run: Path, group: Group):
        self.run, self.group = run, group

    def load(self) -> Optional[dict]:
        import ray.train

        # Ray's newest checkpoint, else (unreadable) its older ones, else the run folder's
        checkpoint = ray.train.get_checkpoint()
        found = first_readable(ray_resume_candidates(checkpoint and Path(checkpoint.path),
                                                     self.run),
                               lambda folder: load_checkpoint(folder / LATEST))
        return None if found is None else found[0]

    def save(self, state: dict, improved: bool, metrics: dict) -> None:
        import ray.train

        numbers = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.group.rank != 0:
            ray.train.report(numbers)
            return
        folder = Path(tempfile.mkdtemp(prefix="exvae-ckpt-"))
        try:
            save_checkpoint(folder / LATEST, state)
            if improved:
                save_checkpoint(self.run / BEST, state)
            save_checkpoint(self.run / LATEST, state)
            ray.train.report(numbers, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def progress_bar(items, desc: str):
    """Rank 0's bar, drawn by the driver (Ray's tqdm forwards it through the log stream)."""
    try:
        from ray.experimental.tqdm_ray import tqdm
    except ImportError:  # an older Ray: no bar
        return items
    return tqdm(items, desc=desc)


def quiet_ray_train_logs() -> None:
    """Ray Train logs a whole `TrainingReport(...)` per report at INFO from every rank (its
    logger is named after its file); our one line per epoch says what matters."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def wrap(model: torch.nn.Module, group: Group, device: torch.device) -> torch.nn.Module:
    """DDP whenever a process group exists (one rank too: the same code path)."""
    if not group.active:
        return model
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def build_parts(cfg: config_mod.ExperimentConfig, run: Path, store: ExemplarStore,
                valid_x: torch.Tensor, dynamic: bool, image_shape, service: Optional[ShardedSearch],
                group: Group, device: torch.device = torch.device("cpu"),
                progress=None, encoders: Optional[list] = None) -> Parts:
    """The loop's parts on one rank (also used by tests with a 1-rank gloo group)."""
    images = StoreImages(store, cfg.ray.resident_mb << 20)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg, image_shape).to(device)
    cache = None
    if model.prior_kind == "exemplar":
        uses_index = cfg.prior.rat
        background = None
        if uses_index and encoders:
            from .refresh_actors import BackgroundRefresh

            background = BackgroundRefresh(encoders, store, service, cfg.index.keep_versions)
        refresh = LatentRefresh(store, images, group, service if uses_index else None,
                                cfg.index.keep_versions, device=device,
                                resident_bytes=cfg.ray.resident_mb << 20, background=background)
        cache = StoreCache(refresh, service if uses_index else None, group,
                           cfg.index.wait_for_refresh, cfg.index.query_timeout_s,
                           background=bool(encoders))
    return Parts(cfg=cfg, model=model, wrapped=wrap(model, group, device), train_images=images,
                 valid_x=valid_x, dynamic=dynamic, image_shape=tuple(image_shape), cache=cache,
                 sink=RaySink(run, group), tracker=make_tracker(cfg, run, group.rank), run=run,
                 group=group, device=device, progress=progress,
                 tags={"trainer": "ray", "num_workers": group.world})


def train_loop_per_worker(config: dict) -> None:
    """The TorchTrainer's train_loop_per_worker. config (from driver.make_trainer):
    config (dict), run_path, store_path, service (actor handle or None), valid (ObjectRef of
    uint8 [Nv, D]), dynamic, image_shape."""
    import ray
    import ray.train.torch

    cfg = config_mod.from_dict(config["config"])
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_ray_train_logs()
    device = ray.train.torch.get_device()
    group = Group.current(device)
    torch.set_num_threads(cfg.train.threads or max(1, int(cfg.ray.cpus_per_worker)))
    service = (ShardedSearch(config["service"], cfg.ray.search_retries,
                             timeout_s=cfg.index.query_timeout_s)
               if config.get("service") else None)
    parts = build_parts(cfg, Path(config["run_path"]), ExemplarStore(config["store_path"]),
                        from_bytes(ray.get(config["valid"])), config["dynamic"],
                        config["image_shape"], service, group, device, progress_bar,
                        encoders=config.get("encoders"))
    fit(parts)
