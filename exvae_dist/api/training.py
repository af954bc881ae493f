"""Training from Python: fit() on an array, a store or a named dataset, with the command
line's config and run folders, one process or Ray; train(), the one path of `exvae train`,
`exvae trainer` and fit(); the best checkpoint logged as an MLflow model."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .model import ExemplarVAE, dotlist

log = logging.getLogger(__name__)


def fit(images=None, labels=None, config: Optional[str | os.PathLike] = None,
        ray: bool | str = False, overrides: Sequence[str] = (), valid: Optional[int] = None,
        test: Optional[int] = None, **keys: Any) -> ExemplarVAE:
    """Trains (or resumes) a run as the command line does, and returns the trained model.

    images: None (the config's data: a named dataset or data.store), a path of a store made by
    ingest, or an array [N, C, H, W] / [N, H, W] (uint8 or floats in [0, 1]) with optional
    labels [N]: ingested once into <train.run_dir>/stores/array-<content hash>.zarr (valid /
    test rows held out, default 10% each, at most 10,000) and trained on as data.name=store.
    config: a YAML file or bundled config name (`--config`); keys: config keys, dotted
    ({"train.epochs": 10}) or as sections (train={"epochs": 10}); overrides: key=value strings.
    ray: False trains in this process; True on Ray (a local Ray, or RAY_ADDRESS); a string is
    the cluster's address. The run folder is train.run_dir/<train.name>, as on the command
    line: the same call again resumes it.
    """
    from .. import config as config_mod
    from ..runs import run_folder

    wanted = [*overrides, *dotlist(keys)]
    if isinstance(ray, str):
        wanted.append(f"ray.address={ray}")
    # under `ray job submit` a default ./runs would be deleted with the job's folder: the run
    # (and an array's store) go to the persistent default instead
    first = config_mod.load(config, wanted, env=os.environ)
    config_mod.check_trainer_keys(first, "ray" if ray else "one-process")  # before any work
    moved = run_folder.outside_job_dir(first, run_folder.run_dir_given(config, wanted),
                                       os.environ)
    if moved is not first:
        wanted.append(f"train.run_dir={moved.train.run_dir}")
    if images is not None:
        if isinstance(images, (str, os.PathLike)):
            store = Path(images).expanduser().resolve()
        else:
            store = ingest_array(images, labels, Path(moved.train.run_dir), valid, test)
        # the whole array (or store) is the data: the config's sizes and classes of a named
        # dataset do not apply, unless given here
        given = config_mod.override_keys(wanted)
        wanted = [*(f"data.{k}=null" for k in ("n_train", "n_valid", "n_test", "labels")
                    if f"data.{k}" not in given),
                  *wanted, "data.name=store", f"data.store={store}"]
    cfg = config_mod.load(config, wanted, env=os.environ)
    train(cfg, bool(ray))
    return ExemplarVAE.load(cfg.run_path(), device=cfg.train.device,
                            overrides=[f"data.root={cfg.data.root}"] if cfg.data.root else ())


def train(cfg, ray: bool) -> dict:
    """Trains (or resumes) cfg's run on Ray or in this process, then logs its best checkpoint
    as an MLflow model when tracking is enabled; returns the run's summary. The one path of
    `exvae train` / `exvae trainer` and fit()."""
    if ray:
        # a local Ray stays on loopback, without token auth or usage reporting; explicit
        # settings in the environment win
        for name, value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
                            ("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0")):
            os.environ.setdefault(name, value)
        from ..train.driver import run

        summary = run(cfg)
    else:
        from ..train.local import fit as fit_one_process

        summary = fit_one_process(cfg)
    if cfg.tracking.enabled:
        log_best_model(cfg)
    return summary


def log_best_model(cfg) -> None:
    """The run's best checkpoint as an MLflow model (mlflow_model.py). The training itself
    has succeeded: a failure here is a warning, not a failed run."""
    try:
        from .mlflow_model import log_model

        log_model(ExemplarVAE.load(cfg.run_path(), overrides=(
            [f"data.root={cfg.data.root}"] if cfg.data.root else ())))  # logs its URI
    except Exception as err:  # noqa: BLE001 (reported, and the run's result stands)
        log.warning("could not log %s as an MLflow model: %s: %s", cfg.run_path(),
                    type(err).__name__, err)


def ingest_array(images, labels, run_dir: Path, valid: Optional[int] = None,
                 test: Optional[int] = None) -> Path:
    """An in-memory array as an exemplar store (the ingest command's code), named by its
    content so that the same array finds the same store; returns its path."""
    import hashlib

    from ..data.ingest import ArraySource, ingest

    images = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images)
    if labels is not None:
        labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor)
                            else labels)
    digest = hashlib.sha256(images.tobytes() + str(images.shape).encode()
                            + (b"" if labels is None else labels.astype(np.int64).tobytes()))
    default = max(1, min(10_000, len(images) // 10))
    n_valid, n_test = (default if valid is None else valid), (default if test is None else test)
    path = (Path(run_dir).expanduser().resolve() / "stores"
            / f"array-{digest.hexdigest()[:16]}-{n_valid}-{n_test}.zarr")
    source = ArraySource(images, labels, {"kind": "array", "sha256": digest.hexdigest()},
                         "array")
    try:
        ingest(source, path, n_valid=n_valid, n_test=n_test, progress=False)
    except FileExistsError as err:
        if "already a complete store" not in str(err):
            raise
    return path


# ---------------------------------------------------------------------------- MLflow models
