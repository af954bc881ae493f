"""The one-process trainer: no Ray, no cluster; `python -m exvae_dist.trainer`.

A shell around loop.fit: the training set on the training device, an in-memory latent cache
searched exactly in torch, checkpoints as files in the run folder, and MLflow.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import torch

from .. import config as config_mod
from ..runs import run_folder
from ..runs.checkpoint import BEST, LATEST, load_resume_state, save_checkpoint
from ..data import DataSplits, load_dataset
from ..core.loop import Parts, fit as fit_parts
from ..core.objective import build_model, encode_means
from ..core.exact import TorchExactSearch
from ..runs.run_lock import exclusive_run
from ..runs.tracking import make_tracker, probe

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """train.device as a torch.device; a clear error when CUDA was asked for and is missing."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise config_mod.ConfigError(
            f"train.device={name} but this torch ({torch.__version__}) sees no CUDA device: "
            "install a CUDA build of torch on a GPU machine, or set train.device=cpu")
    return device


class InMemoryCache:
    """loop.ExemplarCache of one process: all N exemplar means in a tensor on the training
    device, re-encoded by each refresh and searched exactly (retrieval/exact.py)."""

    def __init__(self, images: torch.Tensor, search: Optional[TorchExactSearch]):
        self.images = images
        self.search = search
        self.latest: Optional[int] = None
        self.built_at: dict[int, int] = {}
        self._latents: Optional[torch.Tensor] = None
        self._resumed: Optional[tuple[int, int]] = None  # (version, step) to encode again

    def start(self, saved: Optional[dict], step: int) -> bool:
        # nothing persists but the number: the first refresh re-encodes the checkpoint's
        # version from the checkpoint's weights (which encoded it), under the same number
        if saved and saved.get("cache_version") is not None:
            self._resumed = (saved["cache_version"], saved["cache_version_step"])
        return False

    def refresh(self, net, step: int, background: bool = False) -> None:  # always in place
        self._latents = encode_means(net, self.images)
        version, built = self._resumed or ((self.latest or 0) + 1, step)
        self._resumed = None
        if self.search is not None:
            self.search.update(self._latents, version)  # answers name their version
        self.latest, self.built_at = version, {version: built}

    def centres(self) -> torch.Tensor:
        return self._latents

    def write_back(self, ids, latents: torch.Tensor) -> None:
        """prior.write_back: the means a step re-encoded replace their cached rows at once
        (the reference code's cache update), instead of waiting for the next refresh."""
        ids = torch.as_tensor(ids, dtype=torch.int64, device=self._latents.device)
        if self.search is not None:
            self.search.write_rows(ids, latents)  # its latents are this cache's tensor
        self._latents[ids] = latents.detach().to(self._latents.dtype)

    def state(self) -> dict:
        return {"cache_version": self.latest, "cache_version_step": self.built_at.get(self.latest)}

    def staleness(self, version: int, step: int) -> int:
        return step - self.built_at.get(version, step)

    def step_metrics(self) -> dict:
        return {}


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
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, disable=None, dynamic_ncols=True)


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

    splits = splits or load_dataset(cfg.data)
    # the whole training set lives on the training device (MNIST: 157 MB in float32)
    train_x = torch.from_numpy(splits.train_x).to(device)
    torch.manual_seed(cfg.train.seed)  # the initial weights
    model = build_model(cfg, splits.image_shape).to(device)
    cache = None
    if model.prior_kind == "exemplar":
        # exemplars are encoded from grey levels (the training images before binarization), as
        # the reference code does (METHOD.md 4)
        search = TorchExactSearch(precision=cfg.prior.search_precision) if cfg.prior.rat else None
        cache = InMemoryCache(train_x, search)
    return Parts(cfg=cfg, model=model, wrapped=model, train_images=train_x,
                 valid_x=torch.from_numpy(splits.valid_x).to(device), dynamic=splits.dynamic,
                 image_shape=tuple(splits.image_shape), cache=cache, sink=FileSink(run),
                 tracker=make_tracker(cfg, run), run=run, device=device,
                 progress=progress_bar, tags={"trainer": "one-process"})


def main(argv: Optional[list[str]] = None) -> int:
    from ..commands.cli import train_command

    return train_command("python -m exvae_dist.trainer", argv, ray=False)


if __name__ == "__main__":
    sys.exit(main())
