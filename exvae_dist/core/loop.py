"""The training loop of both trainers: one process (`trainer.py`) and Ray Train (`train/`).

    fit(parts): resume -> first latent version -> per epoch [steps (+ refreshes) ->
                epoch-end refresh -> validation -> early stopping -> checkpoint] -> finish

Nothing here knows about Ray, Zarr or MLflow. A trainer is a shell that builds `Parts`:

    group    the process group (`Group()`: one rank without torch.distributed)
    wrapped  the module a step runs: the model itself, or its DDP wrapper
    cache    the exemplar-latent cache and its neighbour search (`ExemplarCache`): in memory
             for one process, the Zarr store + FAISS index service on Ray
    sink     where checkpoints go and come from (`CheckpointSink`): files in the run folder,
             or Ray Train checkpoints
    recorder metrics.jsonl, grids, curves, summary.json and MLflow on rank 0 (recorder.py),
             a NullRecorder elsewhere

Randomness is keyed, not carried: the global batches of epoch e come from (seed, e), the
exemplar subset of global step t from (seed, t) (core/keyed.py: O(ids asked), never N), and the binarization and reparameterization noise of
step t on rank r from (seed, stream, t, r). No random state is saved or restored, a resumed
run draws exactly what an uninterrupted one draws, and the batches and coins do not depend on
the number of workers (each rank takes its slice of the same global batch).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable, Iterable, Optional, Protocol

import numpy as np
import torch

from .. import config as config_mod
from .group import Group
from .objective import VAEWithPrior, kl_beta, learning_rate
from . import keyed
from .step import PriorSampler, log_var_value, train_step, validation_elbo

log = logging.getLogger(__name__)

# random stream ids of torch's generators (the epoch order and coins are keyed.py's)
BINARIZE, NOISE = 2, 3


def stream_seed(seed: int, stream: int, *key: int) -> int:
    """A 63-bit seed for random stream `stream` at `key` (epoch, or step and rank)."""
    state = np.random.SeedSequence([seed, stream, *key]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class Batches(Sequence):
    """An epoch's global batches of ids: `steps` of them (max_steps caps an epoch), batch i
    made by the subclass's _batch(i)."""

    steps: int

    def _set_steps(self, n: int, batch_size: int, max_steps: Optional[int]) -> None:
        steps = n // batch_size if n >= batch_size else 1  # the last short batch is dropped
        self.steps = min(steps, max_steps) if max_steps else steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.steps <= i < self.steps:
            raise IndexError(f"batch {i} of an epoch of {self.steps}")
        return self._batch(i % self.steps)

    def _batch(self, i: int) -> np.ndarray:
        raise NotImplementedError


class EpochBatches(Batches):
    """The global batches of `epoch`: a keyed shuffle of (seed, epoch) (keyed.epoch_order),
    last short batch dropped. Batch i is computed when asked for, in O(batch_size): nothing
    of size N is built, whatever the number of exemplars."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int,
                 max_steps: Optional[int] = None):
        self.n, self.batch_size = n, batch_size
        self.order = keyed.epoch_order(n, seed, epoch)
        self._set_steps(n, batch_size, max_steps)

    def _batch(self, i: int) -> np.ndarray:
        start = i * self.batch_size
        return self.order(np.arange(start, min(start + self.batch_size, self.n), dtype=np.int64))


def epoch_batches(p: "Parts", epoch: int) -> Sequence:
    """The global batches of `epoch`: a keyed shuffle (EpochBatches)."""
    cfg = p.cfg.train
    return EpochBatches(len(p.train_images), cfg.batch_size, cfg.seed, epoch,
                        cfg.max_steps_per_epoch)


def refresh_interval(prior_cfg, n: int, batch_size: int) -> int:
    """Steps between mid-epoch refreshes: prior.refresh_every, or its auto default (config.py:
    refreshing at ~10% of the encoder work of training, at most every 500 steps)."""
    if prior_cfg.refresh_every:
        return int(prior_cfg.refresh_every)
    return max(500, math.ceil(3 * n / (batch_size * (prior_cfg.k + 1))))


def rank_slice(ids: np.ndarray, group: Group) -> np.ndarray:
    """This rank's contiguous slice of a global batch of ids [B] -> [~B / W]."""
    return np.array_split(ids, group.world)[group.rank]


def binarize(x: torch.Tensor, dynamic: bool, seed: int, step: int, rank: int) -> torch.Tensor:
    """The binary batch a step trains on: a fresh Bernoulli draw of the grey levels (dynamic
    binarization, keyed by step and rank), or the images as they are (static data)."""
    if not dynamic:
        return x
    gen = torch.Generator(device=x.device).manual_seed(stream_seed(seed, BINARIZE, step, rank))
    return torch.bernoulli(x, generator=gen)


def seed_noise(seed: int, step: int, rank: int) -> None:
    """Seeds torch's default generators (CPU and GPUs) by (seed, step, rank) before a step, so
    its reparameterization noise is a function of the step, not of whatever ran before it.
    (Saving and restoring the previous state around each step, torch.random.fork_rng, costs
    0.75 ms a step on CPU; nothing in training needs the old state back.)"""
    torch.manual_seed(stream_seed(seed, NOISE, step, rank))


@dataclass
class EarlyStopping:
    """Validation ELBO (higher is better); patience counts only after KL warm-up."""

    patience: int
    warmup_epochs: int
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, epoch: int, value: float) -> bool:
        """Records an epoch's value; returns True if it is the best so far."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        if epoch >= self.warmup_epochs:
            self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


class ExemplarCache(Protocol):
    """The exemplar-latent cache behind the exemplar prior (core/cache.py is the one
    implementation; where it holds and searches the latents is its placement).

    images  the exemplar images (rows = exemplar ids; `images[ids]` -> float [len, D])
    latest  the newest version written
    """

    images: Any
    latest: Optional[int]

    def search(self, queries: np.ndarray, k: int, among=None) -> tuple[np.ndarray, int]:
        """step.NeighbourSearch over the newest served version (RAT only)."""

    def start(self, saved: Optional[dict], step: int) -> bool:
        """Agrees on versions (all ranks); True when the checkpoint's version can be reused."""

    def refresh(self, net, step: int, background: bool = False) -> None:
        """Re-encodes all exemplars with `net` into a new version (all ranks call it).
        background=True (mid-epoch): a cache may hand the work to encoder actors and return
        before the version exists; its search then answers from the older one meanwhile."""

    def centres(self) -> torch.Tensor:
        """[N, d] means of the newest version (validation, sample grids): a tensor, or
        priors.CentreBlocks when N of them should not be held at once."""

    def state(self) -> dict:
        """What a checkpoint records to reuse the newest version on resume."""

    def staleness(self, version: int, step: int) -> int:
        """Steps since `version` was encoded."""

    def step_metrics(self) -> dict:
        """Extra numbers for the step records (e.g. search retries)."""


class CheckpointSink(Protocol):
    def load(self) -> Optional[dict]:
        """The state to resume from, or None for a fresh run."""

    def save(self, state: dict, improved: bool, metrics: dict) -> None:
        """Called by every rank at the end of each epoch; `state` is complete on rank 0."""


@dataclass
class Parts:
    """What a trainer shell hands the loop."""

    cfg: config_mod.ExperimentConfig
    model: VAEWithPrior  # on `device`
    wrapped: torch.nn.Module  # model or its DDP wrapper
    train_images: Any  # [N, D] rows = exemplar ids (float tensor or store-backed images)
    valid_x: torch.Tensor  # [Nv, D] binary
    dynamic: bool
    image_shape: tuple
    cache: Optional[ExemplarCache]  # None unless the prior is the exemplar prior
    sink: CheckpointSink
    recorder: Any  # recorder.RunRecorder on rank 0 (files, MLflow), a NullRecorder elsewhere
    run: Path
    group: Group = field(default_factory=Group)
    device: torch.device = torch.device("cpu")
    progress: Optional[Callable[..., Iterable]] = None  # (items, desc=..) -> items, rank 0
    tags: dict = field(default_factory=dict)


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """Adam; the fused kernel (one pass over all parameters) is ~2x faster than the default
    per-parameter loop for these small MLPs, on CPU and GPU alike."""
    try:
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without the fused kernel
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, foreach=True)


class TrainState:
    """Everything a checkpoint restores: model, optimizer, early stopping, epoch and step."""

    def __init__(self, parts: Parts):
        cfg = parts.cfg
        self.parts = parts
        self.model = parts.model
        self.optimizer = make_optimizer(parts.model, cfg)
        self.stopper = EarlyStopping(cfg.train.early_stop_patience, cfg.train.warmup_epochs)
        self.epoch, self.step = 0, 0
        self.saved_step = 0  # the step of the last checkpoint (train.checkpoint_every_steps)
        # a mid-epoch checkpoint's place in its epoch (run_epoch's `within`), else None
        self.within: Optional[dict] = None

    def state_dict(self) -> dict:
        p = self.parts
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "early_stopping": asdict(self.stopper), "epoch": self.epoch, "step": self.step,
                "config": config_mod.to_dict(p.cfg), "image_shape": tuple(p.image_shape),
                "world": p.group.world, "within_epoch": self.within,
                **(p.cache.state() if p.cache is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stopper = EarlyStopping(**state["early_stopping"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.saved_step, self.within = self.step, state.get("within_epoch")


def start(p: Parts) -> tuple[TrainState, PriorSampler, Optional[dict]]:
    """The training state (resumed from the sink when it has a checkpoint), the prior sampler,
    and a first latent version of these weights (reused from the checkpoint when it can be)."""
    state = TrainState(p)
    saved = p.sink.load()
    if saved is not None:
        state.load_state_dict(saved)
        log.info("rank %d resumed %s at epoch %d, step %d", p.group.rank, p.run,
                 state.epoch + 1, state.step)
    uses_index = p.cache is not None and p.cfg.prior.rat
    sampler = PriorSampler(p.cfg.prior, p.train_images, p.cache if uses_index else None,
                           seed=p.cfg.train.seed)
    if p.cache is not None and not p.cache.start(saved, state.step):
        p.cache.refresh(p.model.net, state.step)
    return state, sampler, saved


def fit(parts: Parts) -> dict:
    """Trains (or resumes) a run; returns the last epoch's summary (rank 0's is complete)."""
    p, cfg, group = parts, parts.cfg, parts.group
    summary: dict = {}
    try:
        state, sampler, _ = start(p)  # a failed resume or first refresh is the run's failure
        walls = p.recorder.begin(cfg, state.epoch, state.step, p.tags)
        budget = TimeBudget(cfg.train.time_budget_hours, walls)
        out_of_time = False
        while state.epoch < cfg.train.epochs and not state.stopper.should_stop:
            if budget.hours is not None and group.broadcast_int(budget.exhausted()):
                out_of_time = True
                log.info("time budget: %.2f h spent; the next epoch would end past %.2f h",
                         sum(budget.walls) / 3600, budget.hours)
                break
            summary = run_epoch(p, state, sampler)
            save(p, state, bool(summary["improved"]), summary)
            budget.walls.append(summary.get("epoch_seconds", 0.0))
        if state.stopper.should_stop and group.rank == 0:
            log.info("early stopping: no validation improvement for %d epochs",
                     state.stopper.patience)
        summary = p.recorder.finish(summary, state.stopper.should_stop, out_of_time)
    except BaseException as exc:
        p.recorder.failed(exc)
        raise
    return summary


def save(p: Parts, state: TrainState, improved: bool, metrics: dict) -> None:
    """A checkpoint (every rank), then the records it covers to the tracker (rank 0)."""
    p.sink.save(state.state_dict(), improved, metrics)
    state.saved_step = state.step
    p.recorder.commit()


class Tail(Sequence):
    """batches[start:], computed when asked for (a mid-epoch resume skips the done ones)."""

    def __init__(self, batches: Sequence, start: int):
        self.batches, self.start = batches, start

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.batches[self.start + i]


def run_epoch(p: Parts, state: TrainState, sampler: PriorSampler) -> dict:
    """One epoch: steps (with mid-epoch refreshes and checkpoints), the epoch-end refresh,
    validation. A checkpoint taken mid-epoch carries `within` (the batches done, the refresh
    schedule, the epoch's sums), so the resumed epoch ends as the uninterrupted one."""
    cfg, group, cache = p.cfg, p.group, p.cache
    uses_index = cache is not None and cfg.prior.rat
    seed, epoch = cfg.train.seed, state.epoch
    t0 = wall0 = time.perf_counter()
    cpu0 = time.thread_time()
    beta = kl_beta(epoch, cfg.train.warmup_epochs)
    lr = learning_rate(epoch, cfg.train.lr, cfg.train.lr_schedule, cfg.train.epochs)
    for group_ in state.optimizer.param_groups:
        group_["lr"] = lr
    p.model.train()
    batches = epoch_batches(p, epoch)
    keys = ("loss", "log_px", "kl", "candidates", "short_rows")
    # a version of these weights exists at last_refresh (start, epoch end or a refresh);
    # sums and timing: step seconds while the index serves an older version than the
    # newest written, and not
    within = state.within or {
        "batch": 0, "last_refresh": state.step, "sums": dict.fromkeys(keys, 0.0),
        "timing": {"rebuild": [0.0, 0], "steady": [0.0, 0]}, "refresh_seconds": 0.0,
        "seconds": 0.0}
    state.within = None
    last_refresh, sums, timing = within["last_refresh"], within["sums"], within["timing"]
    mid_refresh_seconds, t0 = within["refresh_seconds"], t0 - within["seconds"]
    interval = refresh_interval(cfg.prior, len(p.train_images), cfg.train.batch_size)
    every = cfg.train.checkpoint_every_steps
    t_log, examples_since_log = time.perf_counter(), 0
    items = Tail(batches, within["batch"])
    if p.progress is not None and group.rank == 0 and cfg.train.progress:
        items = p.progress(items, desc=f"epoch {epoch + 1}/{cfg.train.epochs}")
    for i, ids in enumerate(items, start=within["batch"]):
        if uses_index and state.step - last_refresh >= interval:
            tr = time.perf_counter()
            cache.refresh(p.model.net, state.step, background=True)
            mid_refresh_seconds += time.perf_counter() - tr
            last_refresh = state.step
        # a mid-epoch checkpoint (train.checkpoint_every_steps), with retrieval only where
        # a refresh has just encoded the latents of these very weights: a resume re-encodes
        # them (or reuses the stored version) and goes on exactly as this run does
        if (every and i > 0 and state.step - state.saved_step >= every
                and (not uses_index or last_refresh == state.step)):
            state.within = {"batch": i, "last_refresh": last_refresh, "sums": sums,
                            "timing": timing, "refresh_seconds": mid_refresh_seconds,
                            "seconds": time.perf_counter() - t0}
            save(p, state, False, {"epoch": epoch, "step": state.step})
            state.within = None
        local = rank_slice(ids, group)
        ts = time.perf_counter()
        x = binarize(p.train_images[local].to(p.device), p.dynamic, seed, state.step, group.rank)
        seed_noise(seed, state.step, group.rank)
        prior = sampler(p.model, local, x, state.step)  # queries come from the unwrapped encoder
        m = train_step(p.wrapped, state.optimizer, x, prior, beta, cfg.train.normalize_grads)
        dt = time.perf_counter() - ts
        state.step += 1
        examples_since_log += len(ids)
        if uses_index:
            kind = "rebuild" if m["index_version"] < cache.latest else "steady"
            timing[kind][0] += dt
            timing[kind][1] += 1
        for key in keys:
            sums[key] += m[key]
        if state.step % cfg.train.log_every == 0:
            # means over ranks of the step's numbers (a small all-reduce every log_every steps)
            loss, log_px, kl, cand, short = (s / group.world for s in group.sum(
                [m[k] for k in keys]))
            now = time.perf_counter()
            record = {"step": state.step, "epoch": epoch, "beta": beta, "loss": loss,
                      "log_px": log_px, "kl": kl, "candidates": cand, "short_rows": short,
                      "log_var": log_var_value(p.model),
                      "examples_per_second": examples_since_log / max(now - t_log, 1e-9)}
            if uses_index:
                record.update({"index_version": m["index_version"],
                               "staleness": cache.staleness(m["index_version"], state.step),
                               **cache.step_metrics()})
            t_log, examples_since_log = now, 0
            p.recorder.step(record)
            if hasattr(items, "set_postfix"):
                items.set_postfix(loss=f"{loss:.2f}", ex_s=f"{record['examples_per_second']:.0f}",
                                  **({"index": m["index_version"]} if uses_index else {}))
    # both trainers time the same span: the steps and their mid-epoch refreshes
    train_seconds = time.perf_counter() - t0
    # the share of the part of that span this process ran (all of it unless it resumed
    # mid-epoch) that the training thread was on a CPU: below ~0.95 it waited, for a busy
    # core, another rank or I/O (torch's own intra-op threads are not counted)
    thread_cpu_share = (time.thread_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)

    tr = time.perf_counter()
    if cache is not None:  # the next epoch's cache and this epoch's validation centres
        cache.refresh(p.model.net, state.step)
    refresh_seconds = time.perf_counter() - tr
    p.model.eval()
    centres = cache.centres().to(p.device) if cache is not None else None
    val = validate(p, centres)
    improved = state.stopper.update(epoch, val["elbo"])
    state.epoch += 1
    totals = group.sum([sums[k] for k in keys] + [*timing["rebuild"], *timing["steady"]])
    n_steps = max(1, len(batches))
    summary = {"epoch": state.epoch, "step": state.step, "beta": beta, "lr": lr,
               **{f"train_{k}": v / (n_steps * group.world) for k, v in zip(keys, totals)},
               **{f"val_{k}": v for k, v in val.items()},
               "log_var": log_var_value(p.model), "train_seconds": train_seconds,
               "train_thread_cpu_share": thread_cpu_share,
               "refresh_seconds": refresh_seconds + mid_refresh_seconds,
               "epoch_seconds": time.perf_counter() - t0,
               "examples_per_second": len(batches) * cfg.train.batch_size / train_seconds,
               "best_val_elbo": state.stopper.best, "best_epoch": state.stopper.best_epoch + 1,
               "improved": float(improved), "num_workers": group.world}
    # the share of the epoch spent re-encoding exemplars (mid-epoch and epoch-end refreshes)
    summary["refresh_share"] = summary["refresh_seconds"] / max(summary["epoch_seconds"], 1e-9)
    if uses_index:
        r_s, r_n, s_s, s_n = totals[len(keys):]
        summary.update({"index_version": cache.latest, "refresh_every": interval,
                        "step_ms_during_rebuild": 1e3 * r_s / r_n if r_n else math.nan,
                        "steps_during_rebuild": r_n / group.world,
                        "step_ms_steady": 1e3 * s_s / s_n if s_n else math.nan})
    p.recorder.epoch(summary, p.model, centres, p.image_shape)
    if group.rank == 0:
        log.info("epoch %d/%d: train loss %.2f, val ELBO %.2f%s (%.1f s, %.0f examples/s)",
                 state.epoch, cfg.train.epochs, summary["train_loss"], val["elbo"],
                 " (best)" if improved else "", summary["epoch_seconds"],
                 summary["examples_per_second"])
    return summary


def validate(p: Parts, centres: Optional[torch.Tensor]) -> dict:
    """Validation ELBO / log p(x|z) / KL means over all ranks; rank r scores valid_x[r::W]."""
    group = p.group
    mine = p.valid_x[group.rank::group.world].to(p.device)
    v = validation_elbo(p.model, mine, centres, samples=p.cfg.eval.validation_samples)
    n = mine.shape[0]
    elbo, log_px, kl, total = group.sum([v["elbo"] * n, v["log_px"] * n, v["kl"] * n, n])
    total = max(total, 1.0)
    return {"elbo": elbo / total, "log_px": log_px / total, "kl": kl / total}


@dataclass
class TimeBudget:
    """train.time_budget_hours: no epoch starts that would end past the budget, judged by the
    mean wall time of the run's epochs so far (all sessions). Rank 0 judges; fit broadcasts."""
    hours: Optional[float]
    walls: list = field(default_factory=list)

    def exhausted(self) -> bool:
        if self.hours is None:
            return False
        spent = sum(self.walls)
        next_epoch = spent / len(self.walls) if self.walls else 0.0
        return spent + next_epoch > self.hours * 3600
