"""The one configuration object of exvae-dist.

Defaults live here, in dataclasses; `configs/*.yaml` override them; `key=value` arguments on
the command line override both. Unknown keys, wrong types and values outside a field's
choices are errors that name the key.

    cfg = load("configs/mnist_vae.yaml", ["train.epochs=5", "prior.k=20"])
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


@dataclass
class DataConfig:
    # mnist (dynamic binarization) | fashion_mnist | binarized_mnist (static) | omniglot
    name: str = "mnist"
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
    # Exemplars in the prior are encoded from grey-level images, as the reference code does
    # (the only mode implemented: false is refused).
    exemplars_grey: bool = True
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
    k: int = 10
    # Query depth k' = ceil(safety * k * N / M) so that k of them survive the M/N coins.
    safety: float = 2.0
    # Initial value of the learned log-variance lambda of the Parzen window.
    init_log_var: float = -2.0
    # Re-encode the exemplar cache every this many steps (None = once per epoch).
    refresh_every: Optional[int] = None
    # RAT normalizer: "subset" = log|S \ {i}| (a lower bound of the subsampled prior, the
    # default); "union" = log of the retrieved union size (the reference code's choice).
    normalizer: str = "subset"
    # In-memory neighbour search of the one-process trainer: float32 (exact) or bfloat16
    # (bfloat16 first pass, float32 re-ranking of 4k candidates per query).
    search_precision: str = "float32"


@dataclass
class TrainConfig:
    batch_size: int = 100
    lr: float = 5e-4
    # The reference optimizer divides each parameter's gradient by its L2 norm before Adam.
    normalize_grads: bool = True
    epochs: int = 2000
    warmup_epochs: int = 100  # beta rises linearly from 0 to 1 over these epochs
    early_stop_patience: int = 50  # epochs without validation improvement (after warm-up)
    seed: int = 0
    threads: Optional[int] = None  # torch threads (None = torch's default)
    device: str = "cpu"  # cpu | cuda
    # Where runs, checkpoints and artifacts go; a run resumes from run_dir/<name>.
    run_dir: str = "runs"
    name: Optional[str] = None  # None: derived from dataset, architecture and prior
    log_every: int = 50  # steps between metric logs
    max_steps_per_epoch: Optional[int] = None  # cut epochs short (smoke runs, benchmarks)
    progress: bool = True  # progress bars
    # Precision of the exemplars' re-encoding with gradients (the cost of a RAT step):
    # float32 | bfloat16. Posterior, decoder and all log-densities stay in float32.
    exemplar_precision: str = "float32"


@dataclass
class EvalConfig:
    n_samples: int = 5000  # importance samples S per test image
    batch_size: int = 10  # test images per importance-sampling batch
    # exemplars per block of the running logsumexp; null: 2048 on CPU (cache-sized blocks),
    # 16384 on a GPU (fewer, larger kernels)
    exemplar_chunk: Optional[int] = None
    # None = exact prior over all N exemplars; an int = that many nearest exemplars per
    # sample (a lower bound on log p(x), labelled as such in every output).
    prior_neighbours: Optional[int] = None
    n_test: Optional[int] = None  # evaluate on the first n test images (None = all)
    knn_ks: list[int] = field(default_factory=lambda: [3, 5, 7, 9, 11, 13, 15])
    validation_samples: int = 1  # posterior draws per image in the per-epoch validation ELBO
    # Exact prior: per test image, start from the prior_pool exemplars nearest to its
    # posterior mean and grow the pool until the skipped exemplars' mass is certified (triangle
    # inequality) to change log p(z) by at most prior_tolerance nats. prior_pool=0: every
    # sample against all N (slow; the brute-force path). See evaluation/likelihood.py.
    prior_pool: int = 1024
    prior_tolerance: float = 1e-6
    # importance samples per image drawn at once; null: 500 on CPU, 5000 on a GPU
    sample_chunk: Optional[int] = None
    likelihood: bool = True  # compute the importance-sampled log-likelihood
    knn: bool = True  # kNN classification error on encoder means (labelled datasets)
    pictures: bool = True  # samples, exemplar samples, reconstructions, interpolations, t-SNE
    tsne_points: int = 2000  # test means in the t-SNE map (t-SNE is slow on thousands)
    checkpoint: str = "best"  # best | latest: which checkpoint of the run to evaluate
    seed: int = 0  # importance samples, pictures
    # Exemplar set of evaluate / generate / augment / explain: grown (the newest version made
    # by `python -m exvae_dist.exemplars add`, else the training set) | original | a version number.
    exemplars: str = "grown"
    # Evaluate on the test images of these classes (None = data.labels): e.g. unseen digits.
    test_labels: Optional[list[int]] = None


@dataclass
class AugmentConfig:
    """Generative data augmentation (METHOD.md section 4): `python -m exvae_dist.augment`."""

    hidden: int = 1024  # MLP 784-H-H-10, ReLU
    epochs: int = 100
    batch_size: int = 100
    lr: float = 0.1  # SGD momentum 0.9; decays linearly to 1% of this over all steps
    momentum: float = 0.9
    label_smoothing: float = 0.1
    real_weight: float = 0.4  # loss = real_weight * loss(real) + (1 - real_weight) * loss(gen)
    # Each real image gets one fresh exemplar-conditioned sample per step: the decoder's
    # pixel means ("mean") or a Bernoulli draw from them ("bernoulli").
    generated: str = "mean"
    seed: int = 0


@dataclass
class IndexConfig:
    kind: str = "auto"  # auto | flat | ivfpq
    auto_exact_below: int = 200_000  # kind=auto: exact flat index below this many exemplars
    nlist: Optional[int] = None  # IVF lists (None = about 4 * sqrt(N))
    # pq_m / nprobe / refine_factor: measured on clustered d=40 latents (bench/README.md,
    # "Index service"): recall@10 ~0.98 at N=1e6; PQ8 with x4 re-ranking only reached ~0.90.
    pq_m: int = 10  # PQ sub-quantizers (d must divide by it)
    pq_bits: int = 8
    nprobe: int = 64
    refine_factor: int = 10  # exact re-ranking of k * refine_factor candidates (0 = off)
    shards: int = 1
    use_gpu: bool = False
    train_size: int = 100_000  # vectors used to train the coarse quantizer and PQ
    store_path: Optional[str] = None  # Zarr store (None = <run_dir>/<name>/store.zarr)
    keep_versions: int = 3
    service_threads: int = 2  # FAISS threads inside the index actor, for queries
    build_threads: int = 1  # FAISS threads of the background rebuild (leave cores to queries)


@dataclass
class RayConfig:
    num_workers: int = 1
    use_gpu: bool = False
    address: Optional[str] = None  # None: RAY_ADDRESS, else start a local Ray
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    report_every: Optional[int] = None  # steps between ray.train.report (None = per epoch)
    # CPUs each worker reserves; torch in a worker runs this many threads unless
    # train.threads says otherwise (Ray sets OMP_NUM_THREADS to a worker's CPUs).
    cpus_per_worker: float = 1.0
    # Ray Train V2 controller retries (-1 = forever, Ray's default). A run asking for more
    # workers than the cluster can place waits forever at -1; tests use 0 to fail instead.
    controller_failure_limit: int = -1
    keep_checkpoints: int = 2  # Ray Train checkpoints kept on storage (the newest ones)
    # Index-service calls are retried this many times when the actor died or is restarting
    # (backoff 0.2 s doubling, capped at 2 s): an index crash costs seconds, not the run.
    search_retries: int = 10


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: sqlite:///<run_dir>/mlflow.db
    experiment: str = "exvae-dist"
    sample_grid: bool = True


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
    "data.name": ("mnist", "fashion_mnist", "binarized_mnist", "omniglot", "colour_mnist"),
    "model.arch": ("vae", "hvae", "convhvae"),
    "prior.kind": ("gaussian", "vampprior", "exemplar"),
    "prior.normalizer": ("subset", "union"),
    "prior.search_precision": ("float32", "bfloat16"),
    "train.device": ("cpu", "cuda"),
    "train.exemplar_precision": ("float32", "bfloat16"),
    "index.kind": ("auto", "flat", "ivfpq"),
    "eval.checkpoint": ("best", "latest"),
    "augment.generated": ("mean", "bernoulli"),
    "model.likelihood": ("bernoulli", "dlogistic"),
    "data.pixels": ("auto", "binary", "8bit"),
}

POSITIVE = ("model.z_dim", "model.hidden", "prior.k", "prior.n_pseudo", "train.batch_size",
            "train.epochs", "eval.n_samples", "eval.batch_size", "eval.exemplar_chunk",
            "ray.num_workers", "index.shards", "train.log_every", "ray.cpus_per_worker",
            "ray.keep_checkpoints", "model.n_mixtures")
# evaluate / augment
POSITIVE += ("eval.sample_chunk", "eval.tsne_points", "augment.hidden", "augment.epochs",
             "augment.batch_size")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Checks values the type system cannot; raises ConfigError naming the key."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        if _get(cfg, key) is not None and _get(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {_get(cfg, key)}")
    if cfg.prior.safety < 1.0:
        raise ConfigError(f"prior.safety must be >= 1 (got {cfg.prior.safety})")
    if cfg.prior.subsample is not None and cfg.prior.subsample <= 0:
        raise ConfigError(f"prior.subsample must be positive or null, got {cfg.prior.subsample}")
    if cfg.model.logvar_min >= cfg.model.logvar_max:
        raise ConfigError("model.logvar_min must be below model.logvar_max")
    if not cfg.data.exemplars_grey:
        raise ConfigError("data.exemplars_grey=false (exemplars encoded from binarized images) "
                          "is not implemented: exemplars are encoded from grey levels, as the "
                          "reference code does; leave it true")
    if cfg.eval.validation_samples < 1:
        raise ConfigError(f"eval.validation_samples must be >= 1, got "
                          f"{cfg.eval.validation_samples}")
    if cfg.train.warmup_epochs < 0:
        raise ConfigError("train.warmup_epochs must be >= 0")
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
    """Defaults <- YAML file <- `key=value` overrides, validated.

    `env` (default os.environ) supplies EXVAE_DATA_DIR for data.root and RAY_ADDRESS for
    ray.address when neither the file nor the overrides set them; entry points call this,
    library modules never read the environment themselves.
    """
    env = os.environ if env is None else env
    schema = OmegaConf.structured(ExperimentConfig)
    layers = [schema]
    try:
        if config is not None:
            path = resolve_config_path(config)
            layers.append(OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o or o.startswith("+")]
        if bad:
            raise ConfigError(f"overrides must look like section.key=value, got {bad}")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: ExperimentConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        first_line = str(err).splitlines()[0]
        raise ConfigError(f"bad config key {key!r}: {first_line} "
                          f"(see `python -m exvae_dist.train --help` for the keys)") from None
    if cfg.data.root is None and env.get("EXVAE_DATA_DIR"):
        cfg.data.root = env["EXVAE_DATA_DIR"]
    if cfg.ray.address is None and env.get("RAY_ADDRESS"):
        cfg.ray.address = env["RAY_ADDRESS"]
    return validate(cfg)


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(d: dict) -> ExperimentConfig:
    """Rebuilds a config saved with to_dict (checkpoints); validated like a loaded one."""
    merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(d))
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


def describe() -> str:
    """Every key with its default, for --help."""
    lines = []
    for section in dataclasses.fields(ExperimentConfig):
        sub = section.default_factory()
        lines.append(f"  {section.name}:")
        for f in dataclasses.fields(sub):
            default = getattr(sub, f.name)
            choices = CHOICES.get(f"{section.name}.{f.name}")
            extra = f"  (one of {', '.join(choices)})" if choices else ""
            lines.append(f"    {section.name}.{f.name}={default!r}{extra}")
    return "\n".join(lines)
