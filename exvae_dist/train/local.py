"""The one-process trainer: no Ray, no cluster; `python -m exvae_dist.trainer`.

A shell around loop.fit: the training set on the training device, the exemplar cache in this
process (core/cache.py, placement "worker"), checkpoints as files in the run folder,
and MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from .. import config as config_mod
from ..runs import run_folder
from ..runs.hardware import resolve_device
from ..runs.checkpoint import BEST, LATEST, load_resume_state, save_checkpoint
from ..data import DataSplits, load_dataset
from ..core.loop import Parts, fit as fit_parts
from ..core.objective import build_model
from ..core.cache import ExemplarCache
from ..common.levels import exact_levels
from ..runs.run_lock import exclusive_run
from ..runs.recorder import make_recorder
from ..runs.tracking import make_tracker, probe

log = logging.getLogger(__name__)


class FileSink:
    """loop.CheckpointSink of one process: checkpoint.pt (latest) and best.pt in the run folder."""

    def __init__(self, run: Path):
        self.run = run

    def load(self) -> Optional[dict]:
        return load_resume_state(self.run)  # falls back past unreadable checkpoints

    def save(self, state: dict, improved: bool, metrics: dict) -> None:
        if improved:
            save_checkpoint(self.run / BEST, state)
        save_checkpoint(self.run / LATEST, state)


def progress_bar(items, desc: str):
    from ..common.progress import progress_bar as bar  # in place on a terminal, else one line each

    return bar(items, desc=desc, leave=False)


@exclusive_run  # preflight refusals, the run folder's lock, orphans of killed runs swept
def fit(cfg: config_mod.ExperimentConfig, splits: Optional[DataSplits] = None) -> dict:
    """Trains (or resumes) the run cfg.run_path() in this process; returns the final summary."""
    return fit_parts(build_parts(cfg, splits))


def build_parts(cfg: config_mod.ExperimentConfig, splits: Optional[DataSplits] = None) -> Parts:
    """The loop's parts in one process (the run folder and its config.yaml are made here)."""
    config_mod.check_trainer_keys(cfg, "one-process")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    if cfg.tracking.enabled:
        probe(cfg.tracking.uri)
    run = run_folder.prepare(cfg).path  # refuses a changed rerun; writes config.yaml
    # the MLflow run exists before the data: a start that fails shows as FAILED there
    recorder = make_recorder(run, make_tracker(cfg, run), 0, cfg.tracking.sample_grid)
    try:
        splits = splits or load_dataset(cfg.data)
        # the whole training set lives on the training device (MNIST: 157 MB in float32)
        train_x = torch.from_numpy(splits.train_x).to(device)
        torch.manual_seed(cfg.train.seed)  # the initial weights
        model = build_model(cfg, splits.image_shape).to(device)
    except BaseException as exc:
        recorder.failed(exc)
        raise
    # exemplars are encoded from grey levels (the training images before binarization), as
    # the reference code does (METHOD.md 4), held as uint8 levels as the store holds them
    # (the refresh's image layer in int8: core/int8.py); one process: the "worker" placement
    cache = None
    if model.prior_kind == "exemplar":
        levels = exact_levels(splits.train_x)
        cache = ExemplarCache(train_x if levels is None else
                              torch.from_numpy(levels).to(device), rat=cfg.prior.rat)
    return Parts(cfg=cfg, model=model, wrapped=model, train_images=train_x,
                 valid_x=torch.from_numpy(splits.valid_x).to(device), dynamic=splits.dynamic,
                 image_shape=tuple(splits.image_shape), cache=cache, sink=FileSink(run),
                 recorder=recorder, run=run, device=device,
                 progress=progress_bar, tags={"trainer": "one-process"})
