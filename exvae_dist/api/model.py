"""The Python API: a trained Exemplar VAE as an object, and training from Python.

    import exvae_dist
    model = exvae_dist.fit(images, labels, config="smoke", **{"train.epochs": 10})
    model = exvae_dist.ExemplarVAE.load("runs/smoke")          # or a checkpoint, an MLflow
    images, ids = model.sample(16, seed=0)                    # run id, models:/ or runs:/
    log_px = model.log_prob(test_images)                      # nats per image

The commands are shells over the same code: `evaluate` scores with ExemplarVAE.log_prob,
`generate` and `sample` draw with generate.generate, `exemplars add` and add_exemplars grow
the set with exemplars.add_exemplars, `explain` and explain() weigh exemplars with
explain.attribution_weights. Images are numpy arrays or tensors, uint8 levels or floats in
[0, 1], one image ([C, H, W], [H, W] for grey, or flat [D]) or a batch ([B, C, H, W],
[B, H, W], [B, D]); anything else is an InputShapeError naming the expected shape.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..common.errors import KnownError
from ..common.levels import from_bytes
from ..common.progress import progress_bar

log = logging.getLogger(__name__)


class InputShapeError(KnownError, ValueError):
    """Images given to ExemplarVAE in a shape or range it cannot use."""

class ExemplarVAE:
    """A trained model with its exemplar set (the prior's centres). Build it with load() or
    fit(); `trained` is the evaluation.runs.TrainedRun it wraps (config, run folder)."""

    def __init__(self, trained, exemplar_set=None, splits=None):
        self.trained = trained
        self._set = exemplar_set
        self._splits = splits

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, source: str | os.PathLike, device: Optional[str] = None,
             exemplars: Optional[str | int] = None, checkpoint: str = "best",
             overrides: Sequence[str] = (), tracking_uri: Optional[str] = None,
             **keys: Any) -> "ExemplarVAE":
        """source: a run folder, a checkpoint file, an MLflow run id (recorded under
        train.run_dir), or an MLflow model URI (models:/NAME/VERSION, models:/m-<id>,
        runs:/<run id>/model). device: where the model runs (default: the CPU, whatever
        the run trained on). exemplars: eval.exemplars (grown: the newest grown version,
        original, or a version number); checkpoint: best or latest; tracking_uri: the MLflow
        store of a models:/ or runs:/ URI (default: MLflow's, e.g. MLFLOW_TRACKING_URI; the
        runs' own is sqlite:///<train.run_dir>/mlflow.db); further config keys as key=value
        strings or keywords ({"train.threads": 1})."""
        from ..evaluation.runs import load_run

        # the arguments first: overrides and keywords that set the same keys win
        wanted = [f"eval.checkpoint={checkpoint}"]
        if device is not None:
            wanted.append(f"train.device={device}")
        if exemplars is not None:
            wanted.append(f"eval.exemplars={exemplars}")
        wanted += [*overrides, *dotlist(keys)]
        source = str(source)
        if source.startswith(("models:/", "runs:/", "m-")) and not Path(source).exists():
            source = str(_download_model(source, tracking_uri))
        trained = load_run(source, wanted, env=os.environ)
        if device is not None:  # else the CPU, wherever the run was trained
            from ..train.local import resolve_device

            trained.model.to(resolve_device(device))
        # a logged model's folder (mlflow_model.py) carries its exemplar set
        return cls(trained, _read_exemplars(Path(trained.path) / "exemplars.npz"))

    # ------------------------------------------------------------------ properties
    @property
    def model(self):
        return self.trained.model

    @property
    def config(self):
        return self.trained.cfg

    @property
    def image_shape(self) -> tuple:
        return tuple(self.trained.image_shape)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def prior_kind(self) -> str:
        return self.model.prior_kind

    @property
    def exemplar_set(self):
        """exemplars.ExemplarSet in use (eval.exemplars), read on first use."""
        if self._set is None:
            from ..evaluation.exemplar_sets import choose_set

            self._set = choose_set(self.trained, self.splits)
        return self._set

    @property
    def splits(self):
        """The run's data splits (read on first use)."""
        if self._splits is None:
            from ..evaluation.runs import load_splits

            self._splits = load_splits(self.config)
        return self._splits

    def centres(self) -> Optional[torch.Tensor]:
        """The exemplar prior's centres [N, d] on the model's device (None for other priors)."""
        latents = self.exemplar_set.latents if self.prior_kind == "exemplar" else None
        return None if latents is None else torch.from_numpy(latents).to(self.device)

    def __repr__(self) -> str:
        n = len(self._set.images) if self._set is not None else "not read yet"
        return (f"ExemplarVAE({self.config.model.arch}, {self.prior_kind} prior, image "
                f"{self.image_shape}, exemplars: {n}, run: {self.trained.path})")

    # ------------------------------------------------------------------ inputs
    def as_batch(self, images) -> tuple[torch.Tensor, bool]:
        """images (module docstring) -> (float32 [B, D] in [0, 1] on the model's device,
        whether one image was given)."""
        c, h, w = self.image_shape
        d = c * h * w
        expected = (f"one image [{c}, {h}, {w}]" + (f" or [{h}, {w}]" if c == 1 else "")
                    + f" or [{d}], or a batch [B, {c}, {h}, {w}]"
                    + (f" or [B, {h}, {w}]" if c == 1 else "") + f" or [B, {d}]")
        x = images.detach().cpu() if isinstance(images, torch.Tensor) else images
        x = np.asarray(x)
        shape = tuple(x.shape)
        if shape in ((c, h, w), (d,)) or (c == 1 and shape == (h, w)):
            single, x = True, x.reshape(1, d)
        elif (len(shape) >= 2 and (shape[1:] in ((c, h, w), (d,))
                                   or (c == 1 and shape[1:] == (h, w)))):
            single, x = False, x.reshape(shape[0], d)
        else:
            raise InputShapeError(f"images of shape {shape}: this model takes {expected} "
                                  f"(uint8 levels or floats in [0, 1])")
        if x.dtype == np.uint8:
            x = from_bytes(x).numpy()
        elif x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer) \
                or np.issubdtype(x.dtype, np.floating):
            dtype, x = x.dtype, x.astype(np.float32)
            if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
                raise InputShapeError(f"{dtype} images must lie in [0, 1] (found "
                                      f"{np.nanmin(x):g}..{np.nanmax(x):g}, or NaN): divide "
                                      f"levels by 255, or pass uint8")
        else:
            raise InputShapeError(f"images of dtype {x.dtype}: pass uint8 levels or floats "
                                  f"in [0, 1]")
        if x.shape[0] == 0:
            raise InputShapeError(f"an empty batch: this model takes {expected}")
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device), single

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def log_prob(self, images, n_samples: Optional[int] = None, seed: Optional[int] = None,
                 progress: bool = False) -> np.ndarray:
        """Importance-sampled log p(x) in nats per image (float64 [B], or a float for one
        image), with the certified exact exemplar prior over all N exemplars, as `evaluate`
        computes it (eval.n_samples, eval.seed, eval.prior_neighbours by default; the same
        seed gives the same numbers as evaluate on the same images)."""
        x, single = self.as_batch(images)
        values = self._log_prob(x, n_samples, seed, progress)["values"].numpy()
        return float(values[0]) if single else values

    def _log_prob(self, x: torch.Tensor, n_samples: Optional[int] = None,
                  seed: Optional[int] = None, progress: bool = False) -> dict:
        """The batched estimate behind log_prob and evaluate: {"values" float64 [B], "pools",
        "max_error", "seconds"}."""
        from ..evaluation.likelihood import PRIOR_TOLERANCE, chunk_sizes
        from ..evaluation.likelihood import estimate_log_likelihood

        e = self.config.eval
        n_samples = e.n_samples if n_samples is None else int(n_samples)
        centres = self.centres()
        torch.manual_seed(e.seed if seed is None else seed)
        values, pools, max_error = [], [], 0.0
        t0 = time.perf_counter()
        starts = range(0, x.shape[0], e.batch_size)
        bar = progress_bar(starts, desc="log-likelihood",
                           total=math.ceil(x.shape[0] / e.batch_size),
                           disable=not progress)
        sample_chunk, exemplar_chunk = chunk_sizes(x.device)
        for start in bar:
            res = estimate_log_likelihood(self.model, x[start:start + e.batch_size], n_samples,
                                          centres, e.prior_neighbours, e.prior_pool,
                                          PRIOR_TOLERANCE, sample_chunk, exemplar_chunk)
            values.append(res.log_px.double().cpu())
            pools += res.pools
            max_error = max(max_error, res.max_error)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(mean=f"{torch.cat(values).mean().item():.2f}", refresh=False)
        return {"values": torch.cat(values), "pools": pools, "max_error": max_error,
                "seconds": time.perf_counter() - t0, "n_samples": n_samples}

    @torch.no_grad()
    def elbo(self, images) -> np.ndarray:
        """One-sample ELBO (beta = 1) per image in nats, with the exemplar prior over all N
        exemplars (normalizer N), as evaluate's test ELBO."""
        x, single = self.as_batch(images)
        out = [self.model(x[s:s + 250], 1.0, centres=self.centres()).elbo.double().cpu()
               for s in range(0, x.shape[0], 250)]
        values = torch.cat(out).numpy()
        return float(values[0]) if single else values

    @torch.no_grad()
    def encode(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(means, log-variances) of q(z_top | x): [B, d] each ([d] for one image)."""
        x, single = self.as_batch(images)
        mean, logvar = self.model.net.encode_top(x)
        mean, logvar = mean.cpu().numpy(), logvar.cpu().numpy()
        return (mean[0], logvar[0]) if single else (mean, logvar)

    @torch.no_grad()
    def reconstruct(self, images) -> np.ndarray:
        """Decoder means at the posterior means: float32 [B, C, H, W] in [0, 1]."""
        x, single = self.as_batch(images)
        out = self.model.net.decode_top(self.model.net.encode_top(x)[0]).cpu().numpy()
        out = out.reshape(len(out), *self.image_shape)
        return out[0] if single else out

    def sample(self, n: int, exemplars: Optional[Sequence[int]] = None, seed: int = 0,
               how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
        """n images from the prior: (float32 [n, C, H, W] in [0, 1], int64 [n] the exemplar
        (row of exemplar_set; pseudo-input for a VampPrior, -1 for a Gaussian) each came
        from). exemplars: condition on these exemplar ids, used in turn. how: decoder "mean"
        or a "sample" x ~ p(x|z). The draws of `exvae generate` with the same seed."""
        from ..evaluation.generation import generate

        out = generate(self.model, self.exemplar_set, n, list(exemplars) if exemplars is not
                       None else None, seed, how, progress=False)
        return out["images"].reshape(n, *self.image_shape), out["exemplar_ids"]

    def exemplar_labels(self, ids) -> Optional[np.ndarray]:
        """The class labels of exemplar ids (-1 where unknown), or None without labels."""
        labels = self.exemplar_set.labels
        return None if labels is None else np.asarray(labels, dtype=np.int64)[np.asarray(ids)]

    @torch.no_grad()
    def nearest_exemplars(self, images, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """The k exemplars whose encoder means are nearest to each image's posterior mean:
        (ids int64 [B, k], Euclidean distances float32 [B, k]), nearest first."""
        from ..core.priors import squared_distances

        if self.prior_kind != "exemplar":
            from ..evaluation.exemplar_sets import ExemplarSetError

            raise ExemplarSetError(f"nearest_exemplars needs the exemplar prior; this model "
                                   f"has a {self.prior_kind} prior")
        x, single = self.as_batch(images)
        centres = self.centres()
        k = min(int(k), centres.shape[0])
        mean = self.model.net.encode_top(x)[0]
        d2, ids = torch.topk(squared_distances(mean, centres), k, dim=1, largest=False)
        ids, dist = ids.cpu().numpy(), d2.clamp_min(0).sqrt().cpu().numpy()
        return (ids[0], dist[0]) if single else (ids, dist)

    def explain(self, images, k: int = 8, n_samples: int = 100, seed: int = 0) -> list[dict]:
        """Exemplar attributions (the posterior responsibility of each exemplar averaged over
        q(z|x), as `exvae explain`): per image the top-k exemplar ids, weights, labels."""
        from ..evaluation.attribution import attribution_weights, summarize

        x, single = self.as_batch(images)
        weights = attribution_weights(self.model, x, self.centres(), n_samples,
                                      torch.Generator().manual_seed(seed))
        rows = summarize(weights, k, self.exemplar_set.labels)
        return rows[0] if single else rows

    def add_exemplars(self, images, labels=None, description: str = "images from Python"
                      ) -> int:
        """Grows the exemplar set without retraining (as `exvae exemplars add`): a new stored
        version under the run folder, used from now on; returns its number."""
        from ..evaluation.exemplar_sets import UNKNOWN_LABEL, add_exemplars, read_version

        x, _ = self.as_batch(images)
        x = x.cpu().numpy()
        labels = (np.full(len(x), UNKNOWN_LABEL, np.int64) if labels is None
                  else np.asarray(labels, np.int64).reshape(len(x)))
        version = add_exemplars(self.trained, x, labels, description, self.splits)
        self._set = read_version(self.trained.path, version)
        return version

# ---------------------------------------------------------------------------- training

def dotlist(keys: dict) -> list[str]:
    """{"train.epochs": 10, "prior": {"k": 5}} -> ["train.epochs=10", "prior.k=5"] (values as
    YAML: lists, null, true/false)."""
    import json

    out = []
    for key, value in keys.items():
        if isinstance(value, dict):
            out += dotlist({f"{key}.{k}": v for k, v in value.items()})
        elif value is None:
            out.append(f"{key}=null")
        elif isinstance(value, bool):
            out.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (list, tuple)):
            out.append(f"{key}={json.dumps(list(value))}")
        else:
            out.append(f"{key}={value}")
    return out


def _download_model(uri: str, tracking_uri: Optional[str] = None) -> Path:
    """A logged model's files (mlflow_model.log_model) in a local folder."""
    import mlflow

    if uri.startswith("m-"):
        uri = f"models:/{uri}"
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                         tracking_uri=tracking_uri))
    except Exception as err:  # MLflow raises its own types for unknown names / ids
        from ..evaluation.runs import RunNotFoundError

        raise RunNotFoundError(f"MLflow has no model {uri!r} (tracking URI "
                               f"{tracking_uri or mlflow.get_tracking_uri()}): "
                               f"{' '.join(str(err).split())}; pass tracking_uri=") from None
    for candidate in (local / "artifacts", local):
        if (candidate / "best.pt").is_file():
            return candidate
    raise RunNotFoundError(f"{uri} is not an exvae-dist model (no artifacts/best.pt "
                           f"in {local})")


def _read_exemplars(path: Path):
    from ..evaluation.exemplar_sets import ExemplarSet

    if not path.is_file():
        return None
    with np.load(path) as f:
        latents = f["latents"] if "latents" in f and f["latents"].size else None
        labels = f["labels"] if "labels" in f and f["labels"].size else None
        return ExemplarSet(images=from_bytes(f["images"]).numpy(),
                           latents=latents, labels=labels, version=int(f["version"]),
                           description=str(f["description"]))
