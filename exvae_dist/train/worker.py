"""The Ray Train worker: a shell around loop.fit, run by every rank of a TorchTrainer.

It builds the loop's parts from what Ray gives it: the process group and device, the model in
DDP, the exemplar images read from the store by id (StoreImages: bounded memory), the exemplar
cache (core/cache.py: in the worker, or written into the store and served by the index
actors, as the driver placed it), and Ray Train checkpoints (`RaySink`).
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
from ..core.shared_grads import average_through_shared_slots, map_shared_slots
from ..retrieval.store import ExemplarStore
from ..runs.recorder import make_recorder
from ..runs.tracking import make_tracker
from ..common.levels import from_bytes
from .refresh import LatentRefresh
from ..core.cache import ACTORS, WORKER, ExemplarCache
from .service_client import ShardedSearch
from .store_images import StoreImages

log = logging.getLogger(__name__)

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
    """Rank 0's bar when the driver writes to a terminal: drawn in place by the driver (Ray's
    tqdm forwards it through the log stream)."""
    try:
        from ray.experimental.tqdm_ray import tqdm
    except ImportError:  # an older Ray: no bar
        return items
    return tqdm(items, desc=desc)


def progress_lines(items, desc: str):
    """Rank 0's progress without a terminal (a log file, CI, `ray job logs`): a plain line at
    most every 30 s (a worker's stderr is never a terminal), where Ray's tqdm would print
    every update three times and a blank line."""
    from ..common.progress import progress_bar as lines

    return lines(items, desc=desc)


def quiet_ray_train_logs() -> None:
    """Ray Train logs a whole `TrainingReport(...)` per report at INFO from every rank (its
    logger is named after its file); our one line per epoch says what matters."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def wrap(model: torch.nn.Module, group: Group, device: torch.device) -> torch.nn.Module:
    """DDP over a process group of several ranks. A world of one rank trains the model
    itself: DDP would only copy every gradient through a one-rank all-reduce. CPU ranks that
    share a machine average through shared memory (core/shared_grads.py)."""
    if not group.active or group.world == 1:
        return model
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    params = [p for p in model.parameters() if p.requires_grad]
    dtypes = {p.dtype for p in params}
    shared = None
    if len(dtypes) == 1:  # one buffer dtype for all buckets (always so for our models)
        shared = map_shared_slots(sum(p.numel() for p in params), group, dtypes.pop())
    if group.rank == 0:
        log.info("gradients averaged %s", "through shared memory (one machine)"
                 if shared is not None else "by gloo's all-reduce")
    if shared is None:
        return DistributedDataParallel(model)
    # All gradients in one bucket: the hook waits for the other ranks once per step, at the
    # end of backward. (Several buckets would make it wait once each, mid-backward; the hook
    # is synchronous, so they would overlap nothing.)
    size_mb = sum(p.numel() * p.element_size() for p in params) / 2**20
    ddp = DistributedDataParallel(model, bucket_cap_mb=size_mb + 1)
    ddp.register_comm_hook(shared, average_through_shared_slots)
    return ddp


def build_parts(cfg: config_mod.ExperimentConfig, run: Path, store: ExemplarStore,
                valid_x: torch.Tensor, dynamic: bool, image_shape, service: Optional[ShardedSearch],
                group: Group, device: torch.device = torch.device("cpu"),
                progress=None, encoders: Optional[list] = None,
                where: str = WORKER) -> Parts:
    """The loop's parts on one rank (also used by tests with a 1-rank gloo group). `where`:
    the exemplar cache's placement (core/cache.py; the driver chooses it)."""
    images = StoreImages(store, cfg.ray.resident_mb << 20)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg, image_shape).to(device)
    cache = None
    if model.prior_kind == "exemplar":
        versions = None
        if where == ACTORS:
            background = None
            if cfg.prior.rat and encoders:
                from .refresh_actors import BackgroundRefresh

                background = BackgroundRefresh(encoders, store, service)
            versions = LatentRefresh(store, images, group, service if cfg.prior.rat else None,
                                     device=device,
                                     resident_bytes=cfg.ray.resident_mb << 20,
                                     background=background)
        cache = ExemplarCache(images, group, rat=cfg.prior.rat, versions=versions,
                              index=service, build_timeout_s=cfg.index.query_timeout_s,
                              background_refresh=bool(encoders))
    return Parts(cfg=cfg, model=model, wrapped=wrap(model, group, device), train_images=images,
                 valid_x=valid_x, dynamic=dynamic, image_shape=tuple(image_shape), cache=cache,
                 sink=RaySink(run, group), run=run,
                 recorder=make_recorder(run, make_tracker(cfg, run, group.rank), group.rank,
                                        cfg.tracking.sample_grid),
                 group=group, device=device, progress=progress,
                 tags={"trainer": "ray", "num_workers": group.world, "cache": where})


def train_loop_per_worker(config: dict) -> None:
    """The TorchTrainer's train_loop_per_worker. config (from driver.make_trainer):
    config (dict), run_path, store_path, service (index shard handles or None), encoders,
    placement (of the exemplar cache), valid (ObjectRef of uint8 [Nv, D]), dynamic,
    image_shape."""
    import ray
    import ray.train.torch

    cfg = config_mod.from_dict(config["config"])
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_ray_train_logs()
    device = ray.train.torch.get_device()
    group = Group.current(device)
    torch.set_num_threads(cfg.train.threads or max(1, int(cfg.ray.cpus_per_worker)))
    service = (ShardedSearch(config["service"], timeout_s=cfg.index.query_timeout_s,
                             safety=cfg.prior.safety)
               if config.get("service") else None)
    parts = build_parts(cfg, Path(config["run_path"]), ExemplarStore(config["store_path"]),
                        from_bytes(ray.get(config["valid"])), config["dynamic"],
                        config["image_shape"], service, group, device,
                        progress_bar if config.get("terminal") else progress_lines,
                        encoders=config.get("encoders"), where=config.get("placement", WORKER))
    fit(parts)
