"""The per-worker loop of the Ray trainer (run by every rank of a TorchTrainer).

Reads top to bottom: group and data -> model (DDP) -> resume -> first latent version ->
per epoch [steps -> refresh -> validation -> early stopping -> checkpoint + report].

Each step is `step.train_step` on the DDP-wrapped VAEWithPrior, the same function the
one-process trainer calls; the neighbour search behind PriorSampler is the index service.
`train.batch_size` is the GLOBAL batch: every rank takes its slice of each batch of the one
epoch permutation that all ranks draw from the same seed, so a run trains on the same batches
whatever the number of workers.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import config as config_mod
from ..checkpoint import (BEST, LATEST, first_readable, load_checkpoint,  # hook: issue16
                          ray_resume_candidates, save_checkpoint)
from ..objective import VAEWithPrior, build_model, kl_beta
from ..retrieval.store import ExemplarStore
from ..step import PriorSampler, log_var_value, train_step, validation_elbo
from ..tracking import NullTracker, make_tracker
from ..trainer import (EarlyStopping, MetricsLog, batch_images, epoch_batches, make_optimizer,
                       finish_run, rng_state, set_rng_state, write_sample_grid)
from .collectives import Group
from .exemplars import StoredImages, from_bytes
from .refresh import LatentRefresh
from .service_client import ServiceSearch

log = logging.getLogger(__name__)

SHARED_STATE = LATEST  # rank 0's file in a Ray checkpoint: the one-process trainer's format


def rank_seed(seed: int, rank: int, stream: int) -> int:
    """Seed of random stream `stream` on `rank`.

    Rank 0 keeps the one-process trainer's seed (seed + stream), so a one-worker run on the
    CPU draws what `trainer.fit` draws (on a GPU the two binarize with generators of different
    devices); other ranks get independent streams (their own coins, binarization and
    reparameterization noise).
    """
    if rank == 0:
        return seed + stream
    return int(np.random.SeedSequence([seed, stream, rank]).generate_state(1)[0])


def shard(ids: np.ndarray, group: Group) -> np.ndarray:
    """This rank's slice of a global batch of ids [B] -> [~B / W]."""
    return np.array_split(ids, group.world)[group.rank]


class Worker:
    """What one rank holds: the model and its DDP wrapper, optimizer, prior sampler, early
    stopping and random streams. `step` is one optimizer step on this rank's ids.

    images: every exemplar (the training set), rows = exemplar ids
    search: a NeighbourSearch (the index service adapter; None unless the prior uses RAT)
    """

    def __init__(self, cfg: config_mod.ExperimentConfig, images: StoredImages, dynamic: bool,
                 image_shape, search, group: Group, device: torch.device = torch.device("cpu")):
        self.cfg, self.images, self.dynamic, self.group, self.device = (
            cfg, images, dynamic, group, device)
        self.image_shape = tuple(image_shape)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.model: VAEWithPrior = build_model(cfg, image_shape).to(device)
        if group.rank:
            torch.manual_seed(rank_seed(cfg.train.seed, group.rank, 3))
        self.ddp = self._wrap(self.model)
        self.optimizer = make_optimizer(self.model, cfg)
        self.sampler = PriorSampler(cfg.prior, images, search,
                                    seed=rank_seed(cfg.train.seed, group.rank, 1))
        self.stopper = EarlyStopping(cfg.train.early_stop_patience, cfg.train.warmup_epochs)
        # one permutation per epoch, the same on every rank (each takes its slice)
        self.batch_rng = np.random.default_rng(cfg.train.seed)
        self.binarize = torch.Generator().manual_seed(rank_seed(cfg.train.seed, group.rank, 2))
        self.epoch, self.step_count = 0, 0

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP whenever a process group exists (one rank too: the same code path)."""
        if not self.group.active:
            return model
        if self.device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[self.device.index])
        return DistributedDataParallel(model)

    def step(self, ids: np.ndarray, beta: float) -> dict:
        """One optimizer step on this rank's exemplar ids [b]; float metrics (step.train_step)."""
        x = batch_images(self.images, ids, self.dynamic, self.binarize).to(self.device)
        prior = self.sampler(self.model, ids, x)  # queries come from the unwrapped encoder
        m = train_step(self.ddp, self.optimizer, x, prior, beta, self.cfg.train.normalize_grads)
        self.step_count += 1
        return m

    def validate(self, valid_x: torch.Tensor, centres: Optional[torch.Tensor]) -> dict:
        """Validation ELBO / log p(x|z) / KL means over all ranks; each rank scores valid_x[r::W]."""
        mine = valid_x[self.group.rank::self.group.world].to(self.device)
        c = centres.to(self.device) if centres is not None else None
        v = validation_elbo(self.model, mine, c, samples=self.cfg.eval.validation_samples)
        n = mine.shape[0]
        elbo, log_px, kl, total = self.group.sum([v["elbo"] * n, v["log_px"] * n, v["kl"] * n, n])
        total = max(total, 1.0)
        return {"elbo": elbo / total, "log_px": log_px / total, "kl": kl / total}

    # -- checkpoints -----------------------------------------------------------------------

    def rank_state(self) -> dict:
        return {"rank": self.group.rank, "world": self.group.world,
                "sampler": self.sampler.state_dict(),
                "batch_rng": self.batch_rng.bit_generator.state,
                "binarize_rng": self.binarize.get_state(), **rng_state(self.device)}

    def shared_state(self, store_version: Optional[int], built_step: int) -> dict:
        """Rank 0's state in the one-process trainer's checkpoint format (so `evaluate` and
        `--no-ray` read it), plus the latent version in use."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **{k: v for k, v in self.rank_state().items() if k not in ("rank", "world")},
                "early_stopping": asdict(self.stopper), "epoch": self.epoch,
                "step": self.step_count, "config": config_mod.to_dict(self.cfg),
                "image_shape": self.image_shape, "store_version": store_version,
                "store_version_step": built_step, "world": self.group.world}

    def load(self, folder: Path) -> dict:
        """Restores from a Ray checkpoint folder; returns the shared state."""
        shared = load_checkpoint(folder / SHARED_STATE)
        self.model.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        self.stopper = EarlyStopping(**shared["early_stopping"])
        self.epoch, self.step_count = shared["epoch"], shared["step"]
        own = folder / f"rank_{self.group.rank}.pt"
        if own.is_file():
            state = load_checkpoint(own)
            self.sampler.load_state_dict(state["sampler"])
            self.batch_rng.bit_generator.state = state["batch_rng"]
            self.binarize.set_state(state["binarize_rng"])
            set_rng_state(state, self.device)
        else:  # more workers than when the checkpoint was written: fresh streams
            log.warning("rank %d: no random state in %s (the run had %s workers); this "
                        "rank starts fresh random streams", self.group.rank, folder,
                        shared.get("world"))
            self.batch_rng.bit_generator.state = shared["batch_rng"]
        return shared


def train_loop_per_worker(config: dict) -> None:
    """The TorchTrainer's train_loop_per_worker. config (from driver.make_trainer):
    config (dict), run_path, store_path, service (actor handle or None), valid (ObjectRef of
    uint8 [Nv, D]), dynamic, image_shape."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = config_mod.from_dict(config["config"])
    logging.basicConfig(level=logging.INFO)
    device = ray.train.torch.get_device()
    group = Group.current(device)
    torch.set_num_threads(cfg.train.threads or max(1, int(cfg.ray.cpus_per_worker)))
    run = Path(config["run_path"])

    # data: exemplars from the store, validation images from the driver
    store = ExemplarStore(config["store_path"])
    images = StoredImages.from_store(store)
    valid_x = from_bytes(ray.get(config["valid"]))
    image_shape = tuple(config["image_shape"])

    # model, sampler over the index service, refresh pass
    service = (ServiceSearch(config["service"], cfg.ray.search_retries)
               if config.get("service") is not None else None)
    worker = Worker(cfg, images, config["dynamic"], image_shape, service, group, device)
    needs_centres = worker.model.prior_kind == "exemplar"
    uses_index = needs_centres and cfg.prior.rat
    refresh = (LatentRefresh(store, images, group, service if uses_index else None,
                             cfg.index.keep_versions, device=device)
               if needs_centres else None)

    # resume
    shared: dict = {}
    checkpoint = ray.train.get_checkpoint()
    found = first_readable(ray_resume_candidates(  # hook: issue16 (fallback past bad ones)
        checkpoint and Path(checkpoint.path), run), worker.load)
    if found is not None:
        shared = found[0]
        log.info("rank %d resumed at epoch %d, step %d", group.rank, worker.epoch,
                 worker.step_count)

    # the first latent version: reused from the checkpoint when still the newest
    if refresh is not None:
        version = refresh.start(shared.get("store_version"),
                                shared.get("store_version_step", worker.step_count))
        if version is None:
            version = refresh.publish(worker.model.net, worker.step_count)
        if uses_index and group.rank == 0:
            _wait_served(service, version, timeout=300)
        group.barrier()

    tracker = make_tracker(cfg, run, group.rank)
    metrics_log = MetricsLog(run / "metrics.jsonl") if group.rank == 0 else None
    if metrics_log is not None:
        dropped = metrics_log.rewind(worker.step_count)
        if dropped:
            log.info("dropped %d metrics records after step %d (an attempt that did not reach "
                     "its next checkpoint)", dropped, worker.step_count)
    if group.rank == 0:
        tracker.log_params(config_mod.flatten(config_mod.to_dict(cfg)))
        tracker.set_tags({"trainer": "ray", "num_workers": group.world})
    summary: dict = {}
    try:
        while worker.epoch < cfg.train.epochs and not worker.stopper.should_stop:
            summary = _epoch(cfg, worker, refresh, uses_index, valid_x, group, run, tracker,
                             metrics_log, service)
            _checkpoint_and_report(worker, refresh, summary, run, group)
        if group.rank == 0:
            finish_run(run, summary, worker.stopper, tracker)
    except BaseException:
        tracker.end("FAILED")
        raise


def _epoch(cfg, worker: Worker, refresh: Optional[LatentRefresh], uses_index: bool,
           valid_x: torch.Tensor, group: Group, run: Path, tracker: NullTracker,
           metrics_log: Optional[MetricsLog], service: Optional[ServiceSearch]) -> dict:
    """One epoch: steps (with mid-epoch refreshes), the epoch-end refresh, validation."""
    import ray.train

    epoch = worker.epoch
    t0 = time.perf_counter()
    beta = kl_beta(epoch, cfg.train.warmup_epochs)
    worker.model.train()
    batches = epoch_batches(len(worker.images), cfg.train.batch_size, worker.batch_rng,
                            cfg.train.max_steps_per_epoch)
    last_refresh = worker.step_count  # the epoch-end refresh of the previous epoch
    sums = dict.fromkeys(("loss", "log_px", "kl", "candidates", "short_rows"), 0.0)
    # step times while the service builds a newer version than it serves, and otherwise
    timing = {"rebuild": [0.0, 0], "steady": [0.0, 0]}
    t_log, examples_since_log = time.perf_counter(), 0
    for ids in batches:
        step = worker.step_count
        if uses_index and cfg.prior.refresh_every and step - last_refresh >= cfg.prior.refresh_every:
            refresh.publish(worker.model.net, step)
            last_refresh = step
        local = shard(ids, group)
        ts = time.perf_counter()
        m = worker.step(local, beta)
        dt = time.perf_counter() - ts
        step = worker.step_count
        examples_since_log += len(ids)
        if uses_index:
            kind = "rebuild" if m["index_version"] < refresh.latest else "steady"
            timing[kind][0] += dt
            timing[kind][1] += 1
        for key in sums:
            sums[key] += m[key]
        if step % cfg.train.log_every == 0:
            # means over ranks of the step's numbers (a small all-reduce every log_every steps)
            loss, log_px, kl, cand, short = (s / group.world for s in group.sum(
                [m["loss"], m["log_px"], m["kl"], m["candidates"], m["short_rows"]]))
            now = time.perf_counter()
            record = {"step": step, "epoch": epoch, "beta": beta, "loss": loss,
                      "log_px": log_px, "kl": kl, "candidates": cand, "short_rows": short,
                      "index_version": m["index_version"],
                      "staleness": (refresh.staleness(m["index_version"], step)
                                    if uses_index else 0),
                      "log_var": log_var_value(worker.model),
                      "examples_per_second": examples_since_log / max(now - t_log, 1e-9),
                      "search_retries": service.retried if service is not None else 0}
            t_log, examples_since_log = now, 0
            if metrics_log is not None:
                metrics_log.write(record)
                tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step)
        if cfg.ray.report_every and step % cfg.ray.report_every == 0:
            ray.train.report({"step": step, "epoch": epoch, "loss": m["loss"]})
    if refresh is not None:
        # the next epoch's cache, and the centres of this epoch's validation
        refresh.publish(worker.model.net, worker.step_count)
    train_seconds = time.perf_counter() - t0

    worker.model.eval()
    centres = refresh.centres() if refresh is not None else None
    val = worker.validate(valid_x, centres)
    improved = worker.stopper.update(epoch, val["elbo"])
    worker.epoch += 1
    means = group.sum([sums[k] for k in sums] + [timing["rebuild"][0], timing["rebuild"][1],
                                                 timing["steady"][0], timing["steady"][1]])
    n_steps = max(1, len(batches))
    summary = {"epoch": worker.epoch, "step": worker.step_count, "beta": beta,
               **{f"train_{k}": v / (n_steps * group.world) for k, v in zip(sums, means)},
               **{f"val_{k}": v for k, v in val.items()},
               "log_var": log_var_value(worker.model), "train_seconds": train_seconds,
               "epoch_seconds": time.perf_counter() - t0,
               "examples_per_second": len(batches) * cfg.train.batch_size / train_seconds,
               "best_val_elbo": worker.stopper.best,
               "best_epoch": worker.stopper.best_epoch + 1,
               "improved": float(improved), "num_workers": group.world}
    r_s, r_n, s_s, s_n = means[len(sums):]
    if uses_index:
        summary.update({"index_version": refresh.latest,
                        "step_ms_during_rebuild": 1e3 * r_s / r_n if r_n else math.nan,
                        "steps_during_rebuild": r_n / group.world,
                        "step_ms_steady": 1e3 * s_s / s_n if s_n else math.nan})
    if group.rank == 0:
        metrics_log.write(summary)
        tracker.log_metrics(summary, worker.step_count)
        if cfg.tracking.sample_grid:
            grid = write_sample_grid(worker.model, centres, run, worker.epoch,
                                     worker.image_shape)
            tracker.log_artifact(grid, "samples")
        log.info("epoch %d: train loss %.2f, val ELBO %.2f (%.1fs, %d workers)", worker.epoch,
                 summary["train_loss"], val["elbo"], summary["epoch_seconds"], group.world)
    return summary


def _checkpoint_and_report(worker: Worker, refresh: Optional[LatentRefresh], summary: dict,
                           run: Path, group: Group) -> None:
    """Every rank writes its random streams, rank 0 the shared state, into one Ray checkpoint
    (Ray merges the ranks' files into one folder); ray.train.report is the per-epoch barrier.
    Rank 0 also keeps checkpoint.pt / best.pt in the run folder for `evaluate`."""
    import ray.train

    version = refresh.latest if refresh is not None else None
    built = refresh.built_at.get(version, worker.step_count) if refresh is not None else 0
    folder = Path(tempfile.mkdtemp(prefix="exvae-ckpt-"))
    try:
        save_checkpoint(folder / f"rank_{group.rank}.pt", worker.rank_state())
        if group.rank == 0:
            shared = worker.shared_state(version, built)
            save_checkpoint(folder / SHARED_STATE, shared)
            if summary.get("improved"):
                save_checkpoint(run / BEST, shared)
            save_checkpoint(run / LATEST, shared)
        metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_served(service: ServiceSearch, version: int, timeout: float) -> None:
    """Blocks until the service answers from `version` or newer (the very first version:
    there is no older index to train on meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        status = service.status()
        if (status.get("version") or 0) >= version:
            return
        if f"version {version}:" in (status.get("last_error") or ""):  # hook: issue16
            raise RuntimeError(f"the index service failed to build version {version}: "
                               f"{status['last_error']}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the index service did not serve version {version} within "
                               f"{timeout} s; last status: {status}")
        time.sleep(0.05)
