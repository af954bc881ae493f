"""The one configuration object of exvae-dist.

Defaults live here, in dataclasses; `configs/*.yaml` override them; `key=value` arguments on
the command line override both. Unknown keys, wrong types and values outside a field's
choices are errors that name the key.

    cfg = load("configs/mnist_vae.yaml", ["train.epochs=5", "prior.k=20"])
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import math
import os
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from .common.errors import KnownError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(KnownError, ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


@dataclass
class DataConfig:
    # mnist (dynamic binarization) | fashion_mnist | binarized_mnist (static) | omniglot
    # | store (an ingested exemplar store, data.store)
    name: str = "mnist"
    # data.name=store: path of a store made by `python -m exvae_dist.ingest SOURCE PATH`
    store: Optional[str] = None
    # Content hash of that store. null: taken from the store and recorded with the run;
    # set (a saved run): the store must match it, or loading refuses.
    store_fingerprint: Optional[str] = None
    # Folder with the dataset files. None: $EXVAE_DATA_DIR, else ~/.cache/exvae_dist/data.
    root: Optional[str] = None
    # Fetch missing files from the official sources (checksums verified).
    download: bool = True
    # Use only the first n training / validation / test images (None = all): smoke runs.
    n_train: Optional[int] = None
    n_valid: Optional[int] = None
    n_test: Optional[int] = None
    # Seed of the one-off binarization of validation and test images.
    binarize_seed: int = 0
    # Keep only images of these classes in every split (None = all), e.g. [0,1,2,3,4].
    labels: Optional[list[int]] = None
    # binary (binarize as above) | 8bit (keep 8-bit levels k/255, nothing binarized) |
    # auto (8bit when model.likelihood=dlogistic, else binary).
    pixels: str = "auto"


@dataclass
class ModelConfig:
    arch: str = "vae"  # vae | hvae | convhvae
    z_dim: int = 40  # size of each stochastic layer
    hidden: int = 300  # width of the gated dense layers
    # hardtanh bounds of the encoder log-variance (reference code: [-6, 2])
    logvar_min: float = -6.0
    logvar_max: float = 2.0
    # p(x|z): bernoulli (binary pixels) | dlogistic (discretized logistic mixture, 8-bit levels)
    likelihood: str = "bernoulli"
    n_mixtures: int = 5  # logistic components per sub-pixel (likelihood=dlogistic)


@dataclass
class PriorConfig:
    kind: str = "exemplar"  # gaussian | vampprior | exemplar
    n_pseudo: int = 500  # VampPrior pseudo-inputs
    # Exemplar prior: size M of the per-minibatch exemplar subset (None = N // 2, the paper).
    subsample: Optional[int] = None
    # Retrieval augmented training: k nearest exemplars per batch element instead of all M.
    rat: bool = True
    k: int = 10  # nearest exemplars retrieved per batch element (RAT)
    # Query depth k' = ceil(safety * k * N / M) of an index actor over all N, so that k of
    # them survive the M/N coins (a search in the worker needs none: it searches S alone).
    safety: float = 2.0
    # Initial value of the learned log-variance lambda of the Parzen window.
    init_log_var: float = -2.0
    # Re-encode the exemplar cache every this many steps, besides the end of every epoch.
    # None = auto: max(500, ceil(3 N / (B (k + 1)))) steps, the steps whose training
    # encodes (with gradients, ~3 passes each) about 9x the N images a refresh encodes, so
    # refreshing stays at ~10% of encoder work, and never more often than every 500 steps
    # (REALM's cadence). MNIST: 500 = once per epoch; N = 1e7: every 27,273 steps.
    refresh_every: Optional[int] = None
    # RAT normalizer: "subset" = log|S \ {i}| (a lower bound of the subsampled prior, the
    # default); "union" = log of the retrieved union size (the reference code's choice).
    normalizer: str = "subset"


@dataclass
class TrainConfig:
    batch_size: int = 100  # global minibatch (split over ray.num_workers in the Ray trainer)
    lr: float = 5e-4  # Adam learning rate
    # "constant" (the paper's) or "cosine": half a cosine from lr to 0 over train.epochs, one
    # rate per epoch (the fast recipe, configs/mnist_vae_exemplar_fast.yaml)
    lr_schedule: str = "constant"
    # The reference optimizer divides each parameter's gradient by its L2 norm before Adam.
    normalize_grads: bool = True
    epochs: int = 2000  # maximum epochs (early stopping usually ends a run first)
    # Wall-time budget over all sessions of the run (the sum of its epochs' wall times):
    # no epoch starts that the mean epoch time so far says would end past it. None: no limit.
    # "As many epochs as fit in one hour" is train.time_budget_hours=1 (set warmup_epochs to
    # match the epochs that will fit; warm-up does not shrink with the budget).
    time_budget_hours: Optional[float] = None
    warmup_epochs: int = 100  # beta rises linearly from 0 to 1 over these epochs
    early_stop_patience: int = 50  # epochs without validation improvement (after warm-up)
    seed: int = 0  # model initialization, batch order, binarization, exemplar subsets
    threads: Optional[int] = None  # torch threads (None = torch's default)
    device: str = "cpu"  # cpu | cuda
    # Where runs, checkpoints and artifacts go; a run resumes from run_dir/<name>.
    run_dir: str = "runs"
    name: Optional[str] = None  # run folder under run_dir; None: <dataset>_<arch>_<prior>
    log_every: int = 50  # steps between metric logs
    # A checkpoint within an epoch once this many steps passed since the last one (with
    # retrieval, prior.rat, at the next latent refresh after that), so an interrupt loses
    # minutes, not an epoch: MNIST's 500-step epochs keep one checkpoint per epoch, 1e7
    # exemplars (100,000 steps an epoch) get one at each refresh. 0: at epoch ends only.
    checkpoint_every_steps: int = 2000
    max_steps_per_epoch: Optional[int] = None  # cut epochs short (smoke runs, benchmarks)
    progress: bool = True  # progress bars
    # A rerun of an existing run folder resumes only when the settings that define the run
    # (run_folder.IDENTITY: data, model, prior, optimisation) match its fingerprint.json.
    # allow_changed=true resumes anyway with the new settings (recorded in fingerprint.json);
    # model shape, dataset and training-set size can never change in place.
    allow_changed: bool = False
    # Start over: the old run folder is moved aside to <name>.replaced-<UTC time> (never
    # deleted; remove it yourself), every time this is given.
    overwrite: bool = False


@dataclass
class EvalConfig:
    n_samples: int = 5000  # importance samples S per test image
    batch_size: int = 10  # test images per importance-sampling batch
    # None = exact prior over all N exemplars; an int = that many nearest exemplars per
    # sample (a lower bound on log p(x), labelled as such in every output).
    prior_neighbours: Optional[int] = None
    n_test: Optional[int] = None  # evaluate on the first n test images (None = all)
    knn_ks: list[int] = field(default_factory=lambda: [3, 5, 7, 9, 11, 13, 15])  # kNN k's
    validation_samples: int = 1  # posterior draws per image in the per-epoch validation ELBO
    # Exact prior: each importance sample starts from the prior_pool exemplars nearest to its
    # image's posterior mean, and its pool grows until the skipped exemplars' mass is certified
    # (triangle inequality) to change its log p(z) by at most 1e-6 nats. prior_pool=0: every
    # sample against all N (slow; the brute-force path). See evaluation/likelihood.py.
    prior_pool: int = 1024
    likelihood: bool = True  # compute the importance-sampled log-likelihood
    knn: bool = True  # kNN classification error on encoder means (labelled datasets)
    pictures: bool = True  # samples, exemplar samples, reconstructions, interpolations, t-SNE
    checkpoint: str = "best"  # best | latest: which checkpoint of the run to evaluate
    seed: int = 0  # importance samples, pictures
    # Subfolder of <run>/eval/ this evaluation writes (None: the UTC start time, so runs never
    # overwrite each other); an existing subfolder of that name is replaced as a whole.
    name: Optional[str] = None
    # Exemplar set of evaluate / generate / augment / explain: grown (the newest version made
    # by `python -m exvae_dist.exemplars add`, else the training set) | original | a version number.
    exemplars: str = "grown"
    # Evaluate on the test images of these classes (None = data.labels): e.g. unseen digits.
    test_labels: Optional[list[int]] = None


@dataclass
class AugmentConfig:
    """Generative data augmentation (METHOD.md section 4): `python -m exvae_dist.augment`."""

    hidden: int = 1024  # MLP 784-H-H-10, ReLU
    epochs: int = 100  # classifier training epochs
    batch_size: int = 100  # classifier minibatch
    lr: float = 0.1  # SGD momentum 0.9; decays linearly to 1% of this over all steps
    real_weight: float = 0.4  # loss = real_weight * loss(real) + (1 - real_weight) * loss(gen)
    # Each real image gets one fresh exemplar-conditioned sample per step: the decoder's
    # pixel means ("mean") or a Bernoulli draw from them ("bernoulli").
    generated: str = "mean"
    seed: int = 0  # classifier initialization, batch order, generated samples


@dataclass
class IndexConfig:
    # auto: below auto_exact_below exemplars (one shard) each Ray worker holds the means and
    # searches them exactly itself, as the one-process trainer does; above, index actors
    # serve an IVF index. flat: index actors with an exact FAISS index, at any N.
    kind: str = "auto"  # auto | flat
    auto_exact_below: int = 200_000  # kind=auto: exact search below this many exemplars
    # kind=auto above auto_exact_below (per shard): IVF<N/64>_HNSW32,<auto_codes>, so query
    # time stays flat in N (bench/README.md). Flat: the raw vectors, exact distances. IVF-PQ:
    # "PQ10,RFlat" (PQ codes re-ranked exactly, the raw vectors kept for that) or "PQ10"
    # (10 bytes a vector instead of 160 where memory needs it; its codes cap the recall, so
    # lower auto_target_recall to what they reach, or every list gets probed)
    auto_codes: str = "Flat"
    # kind=auto's IVF: nprobe is calibrated at every build to the smallest nprobe whose
    # recall of the workers' query depth, measured on the index's own rows against brute
    # force, reaches this (0 = no calibration: 64 lists)
    auto_target_recall: float = 0.95
    shards: int = 1  # IndexService actors, each over a contiguous block of rows
    # a search waits this long for a dead / rebuilding shard, and a worker this long for the
    # first index build (at N = 1e7 an IVF build takes longer: raise it)
    query_timeout_s: float = 300.0
    use_gpu: bool = False  # FAISS on the GPU: needs faiss-gpu instead of faiss-cpu (README)
    store_path: Optional[str] = None  # Zarr store (None = <run_dir>/<name>/store.zarr)
    service_threads: int = 2  # FAISS threads inside the index actor, for queries
    # Mid-epoch refreshes on this many separate encoder actors (Ray, RAT only), from a
    # snapshot of the weights, so that training goes on while the N exemplars are encoded
    # (as REALM's index builders do); 0 = the training workers encode their rows and wait.
    # Worth it only where the cluster has spare CPUs / GPUs. Each reserves
    # ray.cpus_per_worker CPUs. The epoch-end refresh stays on the training workers
    # (validation needs the current weights' latents).
    refresh_workers: int = 0


@dataclass
class RayConfig:
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker, NCCL
    address: Optional[str] = None  # None: RAY_ADDRESS, else start a local Ray
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    # CPUs each worker reserves; torch in a worker runs this many threads unless
    # train.threads says otherwise (Ray sets OMP_NUM_THREADS to a worker's CPUs).
    cpus_per_worker: float = 1.0
    # What a worker holds of the N exemplars: all images when they fit in this many MB
    # (MNIST's 50,000 take 39 MB), else each step reads its batch and candidate rows from the
    # store by id (a pread per row, or an LRU of chunks of this size for compressed layouts);
    # all latent means for validation when they fit, else they are streamed from the store a
    # block at a time (0: always). Either way a worker's memory does not grow with N.
    resident_mb: int = 512


@dataclass
class TrackingConfig:
    # log params, metrics and artifacts to MLflow (rank 0 only); the trainers also log CPU,
    # memory, disk, network (and GPU) usage every 10 s as system/* metrics (needs psutil)
    enabled: bool = True
    # MLflow tracking URI; None: sqlite:///<run_dir>/mlflow.db. An http(s) server is probed
    # for a few seconds before anything starts.
    uri: Optional[str] = None
    experiment: str = "exvae-dist"  # MLflow experiment name
    sample_grid: bool = True  # a grid of 100 prior samples per epoch (samples/, MLflow)


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def run_name(self) -> str:
        if self.train.name:
            return self.train.name
        prior = self.prior.kind + ("_rat" if self.prior.kind == "exemplar" and self.prior.rat else "")
        return f"{self.data.name}_{self.model.arch}_{prior}"

    def run_path(self) -> Path:
        return Path(self.train.run_dir).expanduser().resolve() / self.run_name()


CHOICES = {
    "data.name": ("mnist", "fashion_mnist", "binarized_mnist", "omniglot", "colour_mnist",
                  "store"),
    "model.arch": ("vae", "hvae", "convhvae"),
    "prior.kind": ("gaussian", "vampprior", "exemplar"),
    "prior.normalizer": ("subset", "union"),
    "train.device": ("cpu", "cuda"),
    "train.lr_schedule": ("constant", "cosine"),
    "index.kind": ("auto", "flat"),
    "eval.checkpoint": ("best", "latest"),
    "augment.generated": ("mean", "bernoulli"),
    "model.likelihood": ("bernoulli", "dlogistic"),
    "data.pixels": ("auto", "binary", "8bit"),
}

POSITIVE = ("model.z_dim", "model.hidden", "prior.k", "prior.n_pseudo", "train.batch_size",
            "train.epochs", "eval.n_samples", "eval.batch_size",
            "ray.num_workers", "index.shards", "train.log_every", "ray.cpus_per_worker",
            "train.lr", "model.n_mixtures")
# evaluate / augment
POSITIVE += ("augment.hidden", "augment.epochs", "augment.batch_size", "augment.lr")
# counts and sizes: at least 1 when set (None keeps its documented meaning)
POSITIVE += ("prior.subsample", "prior.refresh_every", "data.n_train", "data.n_valid",
             "data.n_test", "train.threads", "train.max_steps_per_epoch",
             "train.early_stop_patience", "eval.prior_neighbours", "eval.n_test",
             "eval.validation_samples", "index.service_threads", "train.time_budget_hours")
# may be 0 (seeds, counts of nothing, "off")
NON_NEGATIVE = ("ray.resident_mb", "train.checkpoint_every_steps", "index.refresh_workers",
                "train.warmup_epochs", "data.binarize_seed", "train.seed", "eval.seed",
                "augment.seed", "eval.prior_pool", "index.auto_exact_below")
AT_LEAST = {"prior.safety": 1.0, "ray.max_failures": -1}
# [low, high) or [low, high] intervals: probabilities and fractions; the log-variance where
# exp(lambda) and the Parzen log-densities stay finite in float32
INTERVALS = {"prior.init_log_var": (-30.0, 10.0, True),
             "augment.real_weight": (0.0, 1.0, True),
             "index.auto_target_recall": (0.0, 1.0, True)}
NON_EMPTY = ("train.run_dir", "tracking.experiment")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Checks values the type system cannot; raises ConfigError naming the key."""
    # class lists are sets: one spelling of each ([1, 0, 0] is [0, 1]), so a run's record of
    # its classes compares equal however they were written
    for section, key in (("data", "labels"), ("eval", "test_labels")):
        labels = getattr(getattr(cfg, section), key)
        if labels is not None:
            setattr(getattr(cfg, section), key, sorted(set(int(v) for v in labels)))
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for section in dataclasses.fields(cfg):  # nan / inf pass every comparison below
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{f.name}={value} must be a finite number")
    for key in POSITIVE:
        value = _get(cfg, key)
        if value is not None and value <= 0:
            bound = ">= 1" if isinstance(value, int) else "positive"
            raise ConfigError(f"{key} must be {bound}, got {value}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)}")
    for key, low in AT_LEAST.items():
        if _get(cfg, key) < low:
            raise ConfigError(f"{key} must be >= {low}, got {_get(cfg, key)}")
    for key, (low, high, closed) in INTERVALS.items():
        value = _get(cfg, key)
        if not (low <= value <= high if closed else low <= value < high):
            raise ConfigError(f"{key} must lie in [{low}, {high}{']' if closed else ')'}, "
                              f"got {value}")
    for key in NON_EMPTY:
        if not str(_get(cfg, key)).strip():
            raise ConfigError(f"{key} must not be empty")
    name = cfg.train.name
    if name is not None and (not name.strip() or name in (".", "..") or "/" in name
                             or "\\" in name):
        raise ConfigError(f"train.name={name!r} must be a plain folder name (no '/', not '.' "
                          f"or '..'); put the parent folder in train.run_dir")
    if cfg.eval.name is not None and (not cfg.eval.name.strip() or "/" in cfg.eval.name
                                      or cfg.eval.name in (".", "..")):
        raise ConfigError(f"eval.name={cfg.eval.name!r} must be a plain folder name")
    if not cfg.eval.knn_ks or min(cfg.eval.knn_ks) < 1:
        raise ConfigError(f"eval.knn_ks={cfg.eval.knn_ks} must list neighbour counts >= 1 "
                          f"(to skip kNN set eval.knn=false)")
    if cfg.data.name == "store" and not cfg.data.store:
        raise ConfigError("data.name=store needs data.store=PATH (make one with "
                          "`python -m exvae_dist.ingest SOURCE PATH`)")
    if cfg.model.logvar_min >= cfg.model.logvar_max:
        raise ConfigError("model.logvar_min must be below model.logvar_max")
    if cfg.train.allow_changed and cfg.train.overwrite:
        raise ConfigError("train.allow_changed=true and train.overwrite=true contradict each "
                          "other: resume with the new settings, or start over; pick one")
    if cfg.data.pixels == "auto":  # the decoder decides what the data path keeps
        cfg.data.pixels = "8bit" if cfg.model.likelihood == "dlogistic" else "binary"
    if cfg.eval.exemplars not in ("grown", "original") and not cfg.eval.exemplars.isdigit():
        raise ConfigError(f"eval.exemplars={cfg.eval.exemplars!r} is not grown, original or a "
                          f"version number (python -m exvae_dist.exemplars list RUN)")
    return cfg


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A YAML path as given, or the name of a bundled config (`mnist_vae`, `smoke`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))) or "none"
    raise ConfigError(f"config file {str(name_or_path)!r} not found; bundled configs: {known}")


def load(config: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
         env: Optional[dict[str, str]] = None) -> ExperimentConfig:
    """Defaults <- YAML file <- environment <- `key=value` overrides, validated.

    `env` is the entry point's environment (cli.py passes os.environ; library code and tests
    pass a dict or nothing): EXVAE_DATA_DIR sets data.root and RAY_ADDRESS sets ray.address
    unless an override sets them, and paths from the environment are made absolute here (a
    Ray job or worker runs in another folder).
    """
    env = {} if env is None else env
    schema = OmegaConf.structured(ExperimentConfig)
    layers = [schema]
    try:
        if config is not None:
            path = resolve_config_path(config)
            try:
                layer = OmegaConf.load(path)
            except yaml.YAMLError as err:
                raise ConfigError(f"--config {path} is not valid YAML: {_one_line(err)}") from None
            if not isinstance(layer, DictConfig):
                raise ConfigError(f"--config {path} must be a mapping of sections (data:, "
                                  f"model:, ...), got a {type(layer).__name__}")
            layers.append(layer)
        refuse_removed_overrides(overrides)
        bad = [o for o in overrides if "=" not in o or o.startswith("+")]
        if bad:
            raise ConfigError(f"overrides must look like section.key=value, got {bad}")
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except yaml.YAMLError as err:
            raise ConfigError(f"an override's value is not valid YAML ({_one_line(err)}); "
                              f"quote lists whole, e.g. 'data.labels=[0,1]'") from None
        merged = OmegaConf.merge(*layers)
        cfg: ExperimentConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        first_line = str(err).splitlines()[0]
        raise ConfigError(f"bad config key {key!r}: {first_line} "
                          f"(see `python -m exvae_dist.train --help` for the keys)") from None
    apply_env(cfg, env, set_by=override_keys(overrides))
    return validate(cfg)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


ENV_KEYS = {"EXVAE_DATA_DIR": "data.root", "RAY_ADDRESS": "ray.address"}


def override_keys(overrides: Sequence[str]) -> set[str]:
    """The dotted keys a list of key=value overrides sets."""
    return {o.split("=", 1)[0] for o in overrides if "=" in o}


def apply_env(cfg: "ExperimentConfig", env: Mapping[str, str], set_by: set[str]) -> None:
    """The environment's values for ENV_KEYS, except those the command line set."""
    if env.get("EXVAE_DATA_DIR") and "data.root" not in set_by:
        cfg.data.root = str(Path(env["EXVAE_DATA_DIR"]).expanduser().resolve())
    if env.get("RAY_ADDRESS") and "ray.address" not in set_by:
        cfg.ray.address = env["RAY_ADDRESS"]


# Keys of earlier versions that saved configs (checkpoints, run records) may still hold, with
# the value that meant "off" (a run recorded with another value was trained with a lever that
# no longer exists). The levers that bench/README.md measured and did not adopt are here: their
# figures, and the commit that had them, stay there.
REMOVED_KEYS: dict[str, Any] = {
    "data.exemplars_grey": True, "ray.report_every": None,
    "prior.search_precision": "float32", "prior.write_back": False,
    "train.exemplar_precision": "float32", "train.exemplar_grad_threshold": 0.0,
    "train.batching": "random", "train.local_cells": 4, "index.wait_for_refresh": False,
    # index.kind=ivfpq's hand-set IVF-PQ (kind=auto's IVF-HNSW beat it, bench/README.md; PQ
    # codes remain as index.auto_codes) and kind=auto's tuning, now constants of
    # retrieval/index.py, retrieval/service.py and train/refresh.py
    "index.nlist": None, "index.pq_m": 10, "index.pq_bits": 8, "index.nprobe": 64,
    "index.refine_factor": 10, "index.train_size": 100_000, "index.auto_recall_k": None,
    "index.auto_calibration_queries": 512, "index.auto_train_per_list": 64,
    "index.auto_list_size": 64, "index.build_threads": 1, "index.keep_versions": 3,
    "index.refresh_cpus": 1.0, "ray.search_retries": 10, "ray.keep_checkpoints": 2,
    # evaluation and tracking settings nobody needed to change: constants where they are used
    "eval.exemplar_chunk": None, "eval.sample_chunk": None, "eval.tsne_points": 2000,
    "eval.prior_tolerance": 1e-6, "augment.momentum": 0.9, "augment.label_smoothing": 0.1,
    "tracking.system_metrics": True,
    # Ray Train's controller retries: a fixed finite budget now (train/driver.py), not a key
    "ray.controller_failure_limit": -1,
}
# Values of surviving keys that no longer exist, with the value a saved config now gets
# (index.kind is no identity key: a resumed run simply builds the kind=auto index).
REMOVED_VALUES: dict[str, dict[Any, Any]] = {"index.kind": {"ivfpq": "auto"}}


def drop_removed_keys(d: dict) -> dict:
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for dotted in REMOVED_KEYS:
        section, name = dotted.split(".")
        if isinstance(d.get(section), dict):
            d[section].pop(name, None)
    for dotted, renamed in REMOVED_VALUES.items():
        section, name = dotted.split(".")
        values = d.get(section)
        if isinstance(values, dict) and values.get(name) in renamed:
            values[name] = renamed[values[name]]
    return d


def refuse_removed_overrides(overrides: Sequence[str]) -> None:
    """A removed key on the command line is an error that says where it went."""
    removed = sorted(override_keys(overrides) & set(REMOVED_KEYS))
    if removed:
        raise ConfigError(f"{', '.join(removed)} no longer exist: their values are fixed in "
                          f"the code now (bench/README.md and git history say why); drop them")
    for o in overrides:
        key, _, value = o.partition("=")
        if value in REMOVED_VALUES.get(key, {}):
            raise ConfigError(f"{key}={value} no longer exists: use {key}="
                              f"{REMOVED_VALUES[key][value]} (index.auto_codes="
                              f"PQ10,RFlat gives an IVF with PQ codes)")


# keys the one-process trainer has no use for: set to anything but their default, refused
RAY_ONLY_SECTIONS = ("ray", "index")
RAY_ONLY_EXEMPT = ("ray.address",)  # filled from RAY_ADDRESS; harmless without Ray


def check_trainer_keys(cfg: "ExperimentConfig", trainer: str) -> None:
    """Every key is honoured or refused by the trainer that receives it (trainer: "ray" or
    "one-process"); raises ConfigError naming the key and what to do instead."""
    if trainer == "ray":
        if (cfg.train.device == "cuda") != cfg.ray.use_gpu:
            raise ConfigError(f"train.device={cfg.train.device} with ray.use_gpu="
                              f"{str(cfg.ray.use_gpu).lower()}: on Ray each worker trains on "
                              "the GPU Ray gives it; set both train.device=cuda and "
                              "ray.use_gpu=true, or neither")
        return
    defaults = ExperimentConfig()
    for section in RAY_ONLY_SECTIONS:
        for f in dataclasses.fields(getattr(defaults, section)):
            key = f"{section}.{f.name}"
            if key in RAY_ONLY_EXEMPT:
                continue
            if _get(cfg, key) != _get(defaults, key):
                raise ConfigError(f"{key}={_get(cfg, key)!r} has no effect in the one-process "
                                  "trainer (it has no Ray workers and no FAISS index): drop "
                                  "it, or train on Ray (python -m exvae_dist.train)")


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(d: dict) -> ExperimentConfig:
    """Rebuilds a config saved with to_dict (checkpoints); validated like a loaded one."""
    merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                             OmegaConf.create(drop_removed_keys(d)))
    return validate(OmegaConf.to_object(merged))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@functools.lru_cache(maxsize=None)
def field_help(cls: type) -> dict[str, str]:
    """The description of each field of a config dataclass, read from its source comments:
    the comment block right above the field plus the comment at the end of its line. A field
    without either, on the line right after another field, shares that field's block (a
    comment above `n_train, n_valid, n_test` describes all three). Used by `describe`."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app): --help lists keys and defaults
        return {}
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    helps: dict[str, str] = {}
    prev_line, prev_block = -10, ""
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row = node.lineno
        block, above = [], row - 1
        while above in comments and lines[above - 1].lstrip().startswith("#"):
            block.insert(0, comments[above])
            above -= 1
        block_text = " ".join(block)
        trailing = comments.get(row, "") if not lines[row - 1].lstrip().startswith("#") else ""
        if not block_text and not trailing and row == prev_line + 1:
            block_text = prev_block
        helps[node.target.id] = " ".join(t for t in (block_text, trailing) if t)
        prev_line, prev_block = node.end_lineno or row, block_text
    return helps


def describe(prefixes: Optional[tuple[str, ...]] = None, width: int = 100) -> str:
    """Every key (or those starting with one of `prefixes`) as `key=default  meaning`, for
    --help; the meaning comes from the dataclass comments (field_help)."""
    lines = []
    for section in dataclasses.fields(ExperimentConfig):
        sub = section.default_factory()
        helps = field_help(type(sub))
        rows = []
        for f in dataclasses.fields(sub):
            key = f"{section.name}.{f.name}"
            if prefixes and not key.startswith(tuple(prefixes)):
                continue
            default = getattr(sub, f.name)
            shown = "null" if default is None else str(default).lower() \
                if isinstance(default, bool) else str(default)
            meaning = helps.get(f.name, "")
            choices = CHOICES.get(key)
            if choices and not all(c in meaning for c in choices):
                meaning += f" (one of {', '.join(choices)})"
            rows.append((f"{key}={shown}", meaning))
        if not rows:
            continue
        lines.append(f"  {section.name}:")
        pad = max(len(k) for k, _ in rows) + 2
        for key, meaning in rows:
            wrapped = textwrap.wrap(meaning, width=max(40, width - 4 - pad)) or [""]
            lines.append(f"    {key:<{pad}}{wrapped[0]}".rstrip())
            lines.extend(" " * (4 + pad) + more for more in wrapped[1:])
    return "\n".join(lines)
