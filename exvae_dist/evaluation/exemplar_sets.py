"""Grown exemplar sets: a trained model's exemplar set extended without a gradient step
(commands/exemplars.py is the command line: `exemplars add RUN SOURCE`, `list RUN`).

The exemplars of the exemplar prior are data, not weights: new images join a trained model
by encoding them with its (frozen) encoder and appending their means to the Parzen window

    p(z | X') = 1/N' sum_{n <= N'} Normal(z; mu_phi(x_n), s^2 I)

with the learned s^2 = exp(lambda) KEPT. That assumes the bandwidth chosen for the N
training exemplars still suits N' exemplars (a kernel estimate's best bandwidth shrinks
slowly as N grows, and the new images may be less well encoded than the training ones); no
parameter is retrained.

Layout (every version complete and immutable; a new one is written under a temp name and
renamed into place, so a crash leaves no half version):

    <run>/exemplar_sets/v000001/   the training exemplars, written by the first `add`
        store.zarr                 retrieval.store.ExemplarStore: uint8 images, latent version 1
        labels.npy                 int64 [N] class ids (-1 = unknown)
        set.json                   what the version holds and how it was made
    <run>/exemplar_sets/v000002/   v000001 + the added images (its first N latent rows are a
                                   bitwise copy of v000001's), and so on

`evaluate`, `generate`, `augment` and `explain` take eval.exemplars=grown (the newest
version, the default; the training set when none was grown), original, or a version number.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..common.atomic import atomic_dir, sweep_temps
from ..common.errors import KnownError
from ..common.levels import from_bytes, to_bytes

log = logging.getLogger(__name__)

SETS = "exemplar_sets"
UNKNOWN_LABEL = -1


class ExemplarSetError(KnownError, ValueError):
    """An exemplar set or source that cannot be used as asked; the message says why."""


@dataclass
class ExemplarSet:
    """The exemplars a trained model's prior uses.

    images:  float32 [N, D] in [0, 1] (what the encoder sees)
    latents: float32 [N, d] encoder means (None for a prior without exemplars)
    labels:  int64 [N] (UNKNOWN_LABEL where unknown) or None
    version: 0 = the training set encoded now (no stored version); >= 1 a stored version
    """

    images: np.ndarray
    latents: Optional[np.ndarray]
    labels: Optional[np.ndarray]
    version: int
    description: str
    meta: dict = field(default_factory=dict)


def _name(version: int) -> str:
    return f"v{version:06d}"


def sets_dir(run: Path) -> Path:
    return Path(run) / SETS


def list_versions(run: Path) -> list[int]:
    """Complete stored versions (set.json present: it is written last), ascending."""
    root = sets_dir(run)
    if not root.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in root.iterdir()
                  if p.name.startswith("v") and p.name[1:].isdigit() and (p / "set.json").is_file())


def read_version(run: Path, version: int) -> ExemplarSet:
    """A stored version; ExemplarSetError naming the versions there when it is missing."""
    from ..retrieval.store import ExemplarStore

    folder = sets_dir(run) / _name(version)
    if not (folder / "set.json").is_file():
        raise ExemplarSetError(f"{run} has no exemplar set version {version} (versions: "
                               f"{list_versions(run) or 'none'}); grow one with "
                               f"`python -m exvae_dist.exemplars add {run} SOURCE`")
    meta = json.loads((folder / "set.json").read_text())
    store = ExemplarStore(folder / "store.zarr")
    latents = store.read_latents(1)
    images = from_bytes(store.images().reshape(store.n, -1)).numpy()
    labels = np.load(folder / "labels.npy")
    return ExemplarSet(images=images, latents=latents, labels=labels, version=version,
                       description=meta["description"], meta=meta)


def write_version(run: Path, version: int, images: np.ndarray, latents: np.ndarray,
                  labels: np.ndarray, image_shape: Sequence[int], meta: dict) -> Path:
    """Writes version `version` (refused if it exists) through a temp folder + rename."""
    from ..retrieval.store import ExemplarStore

    root = sets_dir(run)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _name(version)
    if final.exists():
        raise ExemplarSetError(f"exemplar set version {version} of {run} exists; versions are "
                               f"immutable")
    if len(images) != len(latents) or len(images) != len(labels):
        raise ExemplarSetError(f"{len(images)} images, {len(latents)} latents and "
                               f"{len(labels)} labels: one of each per exemplar")
    if not np.isfinite(latents).all():
        raise ExemplarSetError("the encoder produced NaN/inf latents; the model or the new "
                               "images are broken")
    with atomic_dir(final) as tmp:  # a killed writer's folder: atomic.sweep_temps
        store = ExemplarStore.create(tmp / "store.zarr",
                                     to_bytes(images).reshape(len(images), *image_shape),
                                     latents.shape[1])
        store.begin_version(1)
        for start in range(0, store.n, store.chunk_rows):  # one writer: every chunk is ours
            store.write_rows(1, start, np.asarray(latents[start:start + store.chunk_rows],
                                                  dtype=np.float32))
        store.mark_complete(1)
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        (tmp / "set.json").write_text(json.dumps({"version": version, "n": int(len(images)),
                                                  "created_at": time.time(), **meta}, indent=2))
    return final


# ---------------------------------------------------------------------------- choosing a set

def training_set(trained, splits) -> ExemplarSet:
    """The run's training exemplars encoded now with its encoder (what training used: grey
    levels), on the model's device."""
    from ..core.step import exemplar_centres

    device = next(trained.model.parameters()).device
    centres = exemplar_centres(trained.model, torch.from_numpy(splits.train_x).to(device))
    labels = splits.train_y if splits.train_y is not None else None
    return ExemplarSet(images=splits.train_x, version=0, labels=labels,
                       latents=None if centres is None else centres.cpu().numpy(),
                       description=f"original: the {len(splits.train_x)} training exemplars")


def choose_set(trained, splits, which: Optional[str] = None) -> ExemplarSet:
    """eval.exemplars (or `which`): grown -> the newest stored version (the training set when
    none was grown), original -> the training set, '<n>' -> stored version n."""
    which = str(trained.cfg.eval.exemplars if which is None else which)
    if trained.model.prior_kind != "exemplar":
        if which not in ("grown", "original"):
            raise ExemplarSetError(f"eval.exemplars={which}: a {trained.model.prior_kind} prior "
                                   f"has no exemplar sets")
        return training_set(trained, splits)
    if which == "original":
        return training_set(trained, splits)
    if which == "grown":
        versions = list_versions(trained.path)
        if not versions or versions[-1] == 1:
            return training_set(trained, splits)
        return read_version(trained.path, versions[-1])
    return read_version(trained.path, int(which))


# ---------------------------------------------------------------------------- growing a set

def parse_ids(text: str) -> list[int]:
    """'5-9' / '0,3,7' / '0-3,8' -> sorted unique ints."""
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        try:
            out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ExemplarSetError(f"{text!r} is not a list of ids or ranges like 0-31,40") from None
    return sorted(out)


def load_source(source: str, cfg, allow_test: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """SOURCE -> (images float32 [M, D] in [0, 1], labels int64 [M], description).

    FILE.npz with `images` (uint8 levels or [0, 1] floats, [M, D] or [M, C, H, W]) and
    optionally `labels`; or DATASET:SPLIT[:LABELS] (e.g. mnist:train:5-9) read with the run's
    data settings (training images as grey levels, as training encodes its exemplars).
    """
    from dataclasses import replace

    from ..data import load_dataset

    if source.endswith(".npz"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ExemplarSetError(f"SOURCE {path} does not exist")
        with np.load(path) as f:
            if "images" not in f:
                raise ExemplarSetError(f"{path} has no 'images' array (found {list(f.keys())})")
            images = f["images"]
            labels = f["labels"] if "labels" in f else np.full(len(images), UNKNOWN_LABEL)
        images = images.reshape(len(images), -1)
        images = (from_bytes(images).numpy() if images.dtype == np.uint8
                  else images.astype(np.float32))
        if images.size and (images.min() < 0 or images.max() > 1):
            raise ExemplarSetError(f"{path}: float images must lie in [0, 1] "
                                   f"(found {images.min():g}..{images.max():g})")
        return images, np.asarray(labels, dtype=np.int64), f"{len(images)} images from {path}"
    parts = source.split(":")
    if len(parts) not in (2, 3) or parts[1] not in ("train", "valid", "test"):
        raise ExemplarSetError(f"SOURCE {source!r} is neither FILE.npz nor DATASET:SPLIT[:LABELS] "
                               f"(e.g. mnist:train:5-9)")
    if parts[1] == "test" and not allow_test:
        raise ExemplarSetError(
            f"SOURCE {source!r} is a test split: evaluate scores the test images against the "
            f"newest exemplar set, so test images among the exemplars would make its "
            f"log-likelihood no longer held out. Add train or valid images, or pass "
            f"--allow-test to do it on purpose (the set's description then says so)")
    labels = parse_ids(parts[2]) if len(parts) == 3 else None
    data_cfg = replace(cfg.data, name=parts[0], labels=labels, n_train=None, n_valid=None,
                       n_test=None)
    splits = load_dataset(data_cfg)
    x = getattr(splits, f"{parts[1]}_x")
    y = getattr(splits, f"{parts[1]}_y")
    y = np.full(len(x), UNKNOWN_LABEL) if y is None else y
    note = " (TEST SPLIT: evaluations on it are not held out)" if parts[1] == "test" else ""
    return x, y.astype(np.int64), f"{len(x)} images of {source}{note}"


def add_exemplars(trained, images: np.ndarray, labels: np.ndarray, source: str,
                  splits=None) -> int:
    """Encodes `images` [M, D] with the trained encoder and writes a new complete version =
    the newest one (the training set on the first call) + these; returns its number."""
    from ..evaluation.runs import load_splits
    from ..core.objective import encode_means

    model = trained.model
    if model.prior_kind != "exemplar":
        raise ExemplarSetError(f"{trained.path} has a {model.prior_kind} prior: only the "
                               f"exemplar prior has exemplars to grow")
    d_image = int(np.prod(trained.image_shape))
    if images.ndim != 2 or images.shape[1] != d_image or not len(images):
        raise ExemplarSetError(f"new exemplars must be [M, {d_image}] images like the "
                               f"training ones {tuple(trained.image_shape)}, got {images.shape}")
    sweep_temps(sets_dir(trained.path))  # what an add killed mid-write left
    versions = list_versions(trained.path)
    meta = {"checkpoint": str(trained.checkpoint), "epoch": trained.epoch,
            "prior_log_var": model.prior.log_var.item(),
            "note": "latents are encoder means of the frozen model; the learned prior "
                    "variance is kept"}
    if not versions:
        base = training_set(trained, splits if splits is not None else load_splits(trained.cfg))
        labels0 = base.labels if base.labels is not None else np.full(len(base.images),
                                                                       UNKNOWN_LABEL)
        write_version(trained.path, 1, base.images, base.latents, labels0, trained.image_shape,
                      {**meta, "description": base.description, "base_version": None})
        versions = [1]
    base = read_version(trained.path, versions[-1])
    # an image already in the set, or met before in this batch (as stored: 8-bit levels),
    # would only double its mixture weight: skipped, and said so
    seen = {row.tobytes() for row in to_bytes(base.images)}
    fresh = np.zeros(len(images), dtype=bool)
    for i, row in enumerate(to_bytes(images)):
        key = row.tobytes()
        fresh[i] = key not in seen
        seen.add(key)
    if not fresh.any():
        raise ExemplarSetError(f"all {len(images)} images of {source} are already exemplars of "
                               f"v{versions[-1]}: nothing to add")
    if not fresh.all():
        log.warning("skipped %d of the %d images: already exemplars of v%d, or repeated",
                    int((~fresh).sum()), len(images), versions[-1])
        images, labels = images[fresh], labels[fresh]
        source = f"{source}, less {int((~fresh).sum())} already in v{versions[-1]} or repeated"
    device = next(model.parameters()).device
    new = encode_means(model.net, torch.from_numpy(np.ascontiguousarray(images)).to(device))
    new = new.cpu().numpy()
    version = versions[-1] + 1
    write_version(trained.path, version, np.concatenate([base.images, images]),
                  np.concatenate([base.latents, new]), np.concatenate([base.labels, labels]),
                  trained.image_shape,
                  {**meta, "description": f"v{versions[-1]} ({len(base.images)}) + {source}",
                   "base_version": versions[-1], "added": int(len(images)), "source": source})
    log.info("exemplar set v%d: %d exemplars (%d added)", version, len(base.images) + len(images),
             len(images))
    return version


# ---------------------------------------------------------------------------- command line
