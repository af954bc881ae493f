"""Finding a trained run (a directory or an MLflow run id) and loading its model and config.

Shared by `python -m exvae_dist.evaluate` and `python -m exvae_dist.augment`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .. import config as config_mod
from ..runs.checkpoint import (BEST, LATEST, UnreadableCheckpoint, find_checkpoint,
                               load_checkpoint)
from ..common.jsonio import write_json  # noqa: F401 (re-exported: strict JSON, atomic)
from ..core.objective import VAEWithPrior, build_model
from ..runs.tracking import RUN_FILE
from ..common.errors import KnownError

log = logging.getLogger(__name__)


class RunNotFoundError(KnownError, FileNotFoundError):
    """The run argument names neither a run directory nor a known MLflow run id."""


@dataclass
class TrainedRun:
    path: Path  # the run directory
    checkpoint: Path
    cfg: config_mod.ExperimentConfig  # the training config with the caller's overrides
    model: VAEWithPrior  # in eval mode
    image_shape: tuple
    epoch: Optional[int]


def resolve_run(run: str, overrides: Sequence[str] = (),
                env: Optional[Mapping[str, str]] = None) -> Path:
    """A run directory (or checkpoint file) as given, else an MLflow run id looked up in the
    `mlflow_run.json` files under train.run_dir (default runs/, or `train.run_dir=` among the
    overrides), else through the MLflow tracking server named by `tracking.uri=`."""
    path = Path(run).expanduser()
    if path.exists():
        return path.resolve()
    dotlist = OmegaConf.from_dotlist([o for o in overrides if "=" in o])
    run_root = Path(OmegaConf.select(dotlist, "train.run_dir", default="runs")).expanduser()
    if run_root.is_dir():
        for saved in run_root.glob(f"**/{RUN_FILE}"):
            try:
                if json.loads(saved.read_text()).get("run_id") == run:
                    return saved.parent.resolve()
            except ValueError:
                log.warning("skipping unreadable %s", saved)
    uri = OmegaConf.select(dotlist, "tracking.uri", default=None)
    if uri:
        from mlflow.tracking import MlflowClient

        try:
            params = MlflowClient(tracking_uri=uri).get_run(run).data.params
        except Exception as err:  # mlflow raises its own exception types for unknown ids
            raise RunNotFoundError(f"MLflow at {uri} has no run {run!r}: {err}") from None
        found = Path(params.get("train.run_dir", "runs")) / params.get("train.name", "")
        if params.get("train.name") in (None, "None") or not found.is_dir():
            raise RunNotFoundError(f"MLflow run {run!r} does not record a run directory that "
                                   f"exists here (train.run_dir / train.name); pass the directory")
        return found.resolve()
    raise RunNotFoundError(
        f"{run!r} is neither a run directory nor an MLflow run id recorded in a {RUN_FILE} "
        f"under {run_root.resolve()}; pass the run directory (e.g. runs/mnist_vae_exemplar_rat), "
        f"train.run_dir=<folder holding the runs>, or tracking.uri=<MLflow URI>")


def config_with_overrides(saved: dict, overrides: Sequence[str],
                          env: Optional[Mapping[str, str]] = None) -> config_mod.ExperimentConfig:
    """The checkpoint's config dict <- the entry point's environment <- key=value overrides,
    validated (the precedence of config.load; `env` is {} unless the entry point passes it)."""
    env = {} if env is None else env
    bad = [o for o in overrides if "=" not in o or o.startswith("+")]
    if bad:
        raise config_mod.ConfigError(f"overrides must look like section.key=value, got {bad}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config_mod.ExperimentConfig),
                                 OmegaConf.create(config_mod.drop_removed_keys(saved)),
                                 OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise config_mod.ConfigError(f"bad config key {key!r}: {str(err).splitlines()[0]} "
                                     f"(see --help for the keys)") from None
    config_mod.apply_env(cfg, env, set_by=config_mod.override_keys(overrides))
    return config_mod.validate(cfg)


def load_run(run: str, overrides: Sequence[str] = (),
             env: Optional[Mapping[str, str]] = None) -> TrainedRun:
    """Resolves `run`, loads its best (eval.checkpoint=best) or latest checkpoint, rebuilds
    the model and returns it with the config."""
    path = resolve_run(run, overrides, env)
    wants = OmegaConf.select(OmegaConf.from_dotlist([o for o in overrides if "=" in o]),
                             "eval.checkpoint", default="best")
    ckpt = find_checkpoint(path, prefer_best=(wants != "latest"))
    named_file = path.is_file()
    if named_file:
        path = path.parent
    try:
        state = load_checkpoint(ckpt)
    except UnreadableCheckpoint as err:
        other = "best" if wants == "latest" else "latest"
        alternative = None if named_file else find_checkpoint(path, prefer_best=(other == "best"))
        if alternative is None or alternative == ckpt:
            raise
        raise UnreadableCheckpoint(f"{err}; or use the run's other checkpoint "
                                   f"{alternative.name}: eval.checkpoint={other}") from None
    if "config" not in state or "model" not in state:
        raise RuntimeError(f"{ckpt} is not an exvae-dist training checkpoint (no 'config' / "
                           f"'model' entries); point to a run directory written by the trainer")
    cfg = config_with_overrides(state["config"], overrides, env)
    image_shape = tuple(state.get("image_shape", (1, 28, 28)))
    model = build_model(cfg, image_shape)
    model.load_state_dict(state["model"])
    model.eval()
    log.info("loaded %s (epoch %s)", ckpt, state.get("epoch"))
    return TrainedRun(path=path, checkpoint=ckpt, cfg=cfg, model=model, image_shape=image_shape,
                      epoch=state.get("epoch"))


def load_splits(cfg):
    """The run's data: training (the original exemplars) and validation images of
    data.labels, test images of eval.test_labels (data.labels when null)."""
    from dataclasses import replace

    from ..data import keep_labels, load_dataset
    from ..data.splits import take_first

    wanted = cfg.eval.test_labels
    if wanted is None or wanted == cfg.data.labels:
        return load_dataset(cfg.data)
    full = load_dataset(replace(cfg.data, labels=None, n_train=None, n_valid=None, n_test=None))
    if full.test_y is None or not np.isin(full.test_y, wanted).any():
        raise config_mod.ConfigError(f"eval.test_labels={list(wanted)} keeps no test image of "
                                     f"{full.name}" + ("" if full.test_y is None else
                                     f" (its classes: {sorted(set(full.test_y.tolist()))})"))
    test = keep_labels(replace(full), wanted)
    splits = take_first(keep_labels(replace(full), cfg.data.labels), cfg.data)
    n = cfg.data.n_test
    splits.test_x, splits.test_y = test.test_x[:n], test.test_y[:n]
    return splits


__all__ = ["TrainedRun", "RunNotFoundError", "resolve_run", "load_run", "config_with_overrides",
           "write_json", "load_splits", "BEST", "LATEST"]
