"""The one-process trainer: no Ray, no cluster; `python -m exvae_dist.trainer`.

Reads top to bottom: data -> model -> resume -> per epoch [refresh cache -> steps ->
validation -> early stopping -> checkpoint]. The Ray Train workers reuse `train_step`
(step.py) and the small helpers here, so both trainers compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import config as config_mod
from .checkpoint import BEST, LATEST, load_resume_state, save_checkpoint  # hook: issue16
from .data import DataSplits, load_dataset
from .run_lock import exclusive_run  # hook: issue16
from .objective import VAEWithPrior, build_model, kl_beta
from .sampling import sample_images, save_grid
from .tracking import make_tracker
from .step import (PriorSampler, TorchExactSearch, exemplar_centres, log_var_value, train_step,
                   validation_elbo)

log = logging.getLogger(__name__)


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


def set_threads(cfg) -> None:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def resolve_device(name: str) -> torch.device:
    """train.device as a torch.device; a clear error when CUDA was asked for and is missing."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise config_mod.ConfigError(
            f"train.device={name} but this torch ({torch.__version__}) sees no CUDA device: "
            "install a CUDA build of torch on a GPU machine, or set train.device=cpu")
    return device


def rng_state(device: torch.device) -> dict:
    """torch's random streams that a step draws from (CPU, and the GPU's when training there)."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """Adam; the fused kernel (one pass over all parameters) is ~2x faster than the default
    per-parameter loop for these small MLPs, on CPU and GPU alike."""
    try:
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without the fused kernel
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, foreach=True)


def batch_images(images: torch.Tensor, ids: np.ndarray, dynamic: bool,
                 generator: torch.Generator) -> torch.Tensor:
    """Training batch [B, D]: binarized afresh (dynamic binarization) or as stored (static)."""
    x = images[torch.from_numpy(ids)]
    return torch.bernoulli(x, generator=generator) if dynamic else x


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator,
                  max_steps: Optional[int] = None) -> list[np.ndarray]:
    """A shuffled epoch as a list of id arrays (the last short batch dropped, as in training)."""
    perm = rng.permutation(n)
    steps = n // batch_size if n >= batch_size else 1
    if max_steps:
        steps = min(steps, max_steps)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


class MetricsLog:
    """metrics.jsonl in the run directory: one JSON object per logged step or epoch."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> int:
        """Drops the records after `step` (written by an attempt that died after the
        checkpoint a resumed run restarts from: those steps are trained again, and would
        otherwise appear twice). Returns how many records were dropped."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the crash
                continue
            if record.get("step", 0) <= step:
                keep.append(line)
        if len(keep) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)
        return len(lines) - len(keep)


@exclusive_run  # hook: issue16 (preflight, run lock, orphan sweep)
def fit(cfg: config_mod.ExperimentConfig, splits: Optional[DataSplits] = None,
        on_epoch: Optional[Callable[[dict, VAEWithPrior, Optional[torch.Tensor]], None]] = None) -> dict:
    """Trains (or resumes) the run cfg.run_path(); returns the final summary dict."""
    set_threads(cfg)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    run = cfg.run_path()
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(config_mod.to_yaml(cfg))

    # data
    splits = splits or load_dataset(cfg.data)
    # the whole training set lives on the training device (MNIST: 157 MB in float32)
    train_x = torch.from_numpy(splits.train_x).to(device)
    valid_x = torch.from_numpy(splits.valid_x).to(device)
    n = train_x.shape[0]

    # model, optimizer, exemplar machinery
    model = build_model(cfg, splits.image_shape).to(device)
    optimizer = make_optimizer(model, cfg)
    search = TorchExactSearch(precision=cfg.prior.search_precision)
    # exemplars are encoded from grey levels (the training images before binarization), as
    # the reference code does (METHOD.md 4)
    exemplar_images = train_x
    sampler = PriorSampler(cfg.prior, exemplar_images, search, seed=cfg.train.seed + 1)
    stopper = EarlyStopping(cfg.train.early_stop_patience, cfg.train.warmup_epochs)
    batch_rng = np.random.default_rng(cfg.train.seed)
    binarize = torch.Generator(device=device).manual_seed(cfg.train.seed + 2)
    epoch, step = 0, 0

    # resume
    state = load_resume_state(run)  # hook: issue16 (falls back past unreadable checkpoints)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        batch_rng.bit_generator.state = state["batch_rng"]
        binarize.set_state(state["binarize_rng"])
        set_rng_state(state, device)
        stopper = EarlyStopping(**state["early_stopping"])
        epoch, step = state["epoch"], state["step"]
        log.info("resumed %s at epoch %d, step %d", run, epoch, step)

    metrics_log = MetricsLog(run / "metrics.jsonl")
    metrics_log.rewind(step)
    tracker = make_tracker(cfg, run)
    tracker.log_params(config_mod.flatten(config_mod.to_dict(cfg)))
    refresh_every = cfg.prior.refresh_every
    uses_cache = model.prior_kind == "exemplar" and cfg.prior.rat
    summary: dict = {}
    centres = None  # exemplar means of the current weights, once an epoch has computed them
    while epoch < cfg.train.epochs and not stopper.should_stop:
        t0 = time.perf_counter()
        beta = kl_beta(epoch, cfg.train.warmup_epochs)
        model.train()
        batches = epoch_batches(n, cfg.train.batch_size, batch_rng, cfg.train.max_steps_per_epoch)
        if uses_cache:
            # the previous epoch's validation centres are these weights' encodings already
            search.update(centres if centres is not None else
                          exemplar_centres(model, exemplar_images))
            built_at = step
        sums: dict[str, float] = {}
        bar = _progress(batches, cfg, f"epoch {epoch + 1}/{cfg.train.epochs}")
        for ids in bar:
            if uses_cache and refresh_every and step - built_at >= refresh_every:
                search.update(exemplar_centres(model, exemplar_images))
                built_at = step
            x = batch_images(train_x, ids, splits.dynamic, binarize)
            prior = sampler(model, ids, x)
            m = train_step(model, optimizer, x, prior, beta, cfg.train.normalize_grads)
            step += 1
            for key in ("loss", "log_px", "kl", "candidates", "short_rows"):
                sums[key] = sums.get(key, 0.0) + m[key]
            if step % cfg.train.log_every == 0:
                record = {"step": step, "epoch": epoch, "beta": beta, **m,
                          "log_var": log_var_value(model),
                          "staleness": step - built_at if uses_cache else 0}
                metrics_log.write(record)
                tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{m['loss']:.2f}")
        train_seconds = time.perf_counter() - t0

        model.eval()
        centres = exemplar_centres(model, exemplar_images)
        val = validation_elbo(model, valid_x, centres, samples=cfg.eval.validation_samples)
        improved = stopper.update(epoch, val["elbo"])
        epoch += 1
        summary = {"epoch": epoch, "step": step, "beta": beta,
                   **{f"train_{k}": v / len(batches) for k, v in sums.items()},
                   **{f"val_{k}": v for k, v in val.items()},
                   "log_var": log_var_value(model), "train_seconds": train_seconds,
                   "epoch_seconds": time.perf_counter() - t0,
                   "examples_per_second": len(batches) * cfg.train.batch_size / train_seconds,
                   "best_val_elbo": stopper.best, "best_epoch": stopper.best_epoch + 1}
        metrics_log.write(summary)
        tracker.log_metrics(summary, step)
        if cfg.tracking.sample_grid:
            tracker.log_artifact(write_sample_grid(model, centres, run, epoch, splits.image_shape),
                                 "samples")
        log.info("epoch %d: train loss %.2f, val ELBO %.2f (%.1fs)", epoch,
                 summary["train_loss"], val["elbo"], summary["epoch_seconds"])
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "sampler": sampler.state_dict(), "batch_rng": batch_rng.bit_generator.state,
                 "binarize_rng": binarize.get_state(), **rng_state(device),
                 "early_stopping": asdict(stopper), "epoch": epoch, "step": step,
                 "config": config_mod.to_dict(cfg), "image_shape": tuple(splits.image_shape)}
        if improved:
            save_checkpoint(run / BEST, state)
        save_checkpoint(run / LATEST, state)
        if on_epoch is not None:
            on_epoch(summary, model, centres)
    return finish_run(run, summary, stopper, tracker)


def finish_run(run: Path, summary: dict, stopper: EarlyStopping, tracker) -> dict:
    """The end of a run, for both trainers: summary.json (atomically; a rerun of a finished run
    keeps the summary it had), the final config and best checkpoint to the tracker."""
    if stopper.should_stop:
        log.info("early stopping: no validation improvement for %d epochs", stopper.patience)
    if not summary and (run / "summary.json").is_file():  # rerun of a finished run
        summary = json.loads((run / "summary.json").read_text())
    summary = {**summary, "stopped_early": stopper.should_stop}
    tmp = run / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(run / "summary.json")
    tracker.log_artifact(run / "config.yaml")
    if (run / BEST).is_file():
        tracker.log_artifact(run / BEST, "checkpoints")
    tracker.end()
    return summary


def write_sample_grid(model: VAEWithPrior, centres, run: Path, epoch: int, image_shape) -> Path:
    """100 prior samples of the current model as run/samples/epoch_XXXX.png."""
    gen = torch.Generator().manual_seed(epoch)
    images = sample_images(model, 100, centres, generator=gen)
    return save_grid(images, run / "samples" / f"epoch_{epoch:04d}.png", image_shape,
                     title=f"{model.prior_kind} prior, epoch {epoch}")


def _progress(items, cfg, desc):
    if not cfg.train.progress:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exvae_dist.trainer",
        description="Train an Exemplar VAE in one process (no Ray). Rerunning the same command "
                    "resumes from the run directory's checkpoint.",
        epilog="Config keys (override with key=value):\n" + config_mod.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML file or bundled config name (configs/); default: built-in defaults")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except config_mod.ConfigError as err:
        parser.error(str(err))
    summary = fit(cfg)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
