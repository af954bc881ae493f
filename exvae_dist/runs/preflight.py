"""Fail fast on inputs that cannot work, in seconds and before Ray or training starts.

Ray Train V2 retries every error a worker raises (its DefaultFailurePolicy treats each
WorkerGroupError as retryable, up to FailureConfig.max_failures, and there is no public hook
for another policy), so a deterministic failure inside a worker costs max_failures + 1
attempts. What can be known up front is therefore checked here, on the driver:

- check_config(cfg): the data files (present, or fetched when data.download, and verified)
  or the ingested store; N or M too small for the exemplar prior's leave-one-out mixture,
  prior.k beyond the subset, more index shards than this machine has CPUs (and a warning
  for a KL warm-up longer than the run).
- check_cluster(cfg): more workers than a cluster without an autoscaler can ever place
  (call it after connecting to Ray, before the trainer).
"""

from __future__ import annotations

import logging
import os

from ..config import ConfigError, ExperimentConfig
from ..core.candidates import subset_size

log = logging.getLogger(__name__)


class PreflightError(ConfigError):
    """A run that cannot work as configured; the message names the cause and the fix."""


def check_config(cfg: ExperimentConfig) -> None:
    """Refuses an exemplar prior whose leave-one-out mixture would be empty.

    The prior of training image i is a mixture over the exemplars of a subset of size M
    other than i (METHOD.md): it needs N >= 2 exemplars and M >= 2 (M = 1 leaves nothing
    whenever the one drawn is i itself). The loss would be inf and the run would die with
    "non-finite loss" instead of this message.
    """
    check_data(cfg)
    warn_short_warmup(cfg)
    if cfg.prior.kind != "exemplar":
        return
    n, what = cfg.data.n_train, f"data.n_train={cfg.data.n_train}"
    if cfg.data.name == "store" and cfg.data.store:
        stored = _store_rows(cfg.data.store)
        if stored is not None and (n is None or stored < n):
            n, what = stored, f"data.store={cfg.data.store} holds {stored} training images"
    if n is None and _named_n_train(cfg.data.name):  # at most this many (data.labels cuts it)
        n = _named_n_train(cfg.data.name)
        what = f"data.name={cfg.data.name} has {n}"
    if n is not None and n < 2:
        raise PreflightError(
            f"{what}: the exemplar prior of each training image is a leave-one-out "
            f"mixture over the OTHER training images, so it needs at least 2 (use more "
            f"images, or prior.kind=gaussian)")
    m = cfg.prior.subsample
    if m is None and n is not None:
        m = subset_size(n, None)  # the default, as step.PriorSampler computes it
        key = f"prior.subsample (default N // 2 = {m}, as {what})"
    else:
        key = f"prior.subsample={m}"
    if m is not None and m < 2:
        raise PreflightError(
            f"{key}: a leave-one-out mixture over a subset of M={m} exemplar is empty whenever "
            f"that exemplar is the image itself; set prior.subsample >= 2 (and use at least 4 "
            f"training images for the default N // 2)")
    if cfg.prior.rat and m is not None and cfg.prior.k > m - 1:
        raise PreflightError(
            f"prior.k={cfg.prior.k}: each step's prior retrieves the k nearest of the M - 1 = "
            f"{m - 1} other exemplars in its subset ({key}), so k cannot exceed {m - 1}; lower "
            f"prior.k (the paper uses 10), or set prior.rat=false for the mixture over all of S")
    check_index_shards(cfg)


def _named_n_train(name: str) -> int | None:
    """The training images of a named data set (before data.labels), None for others."""
    from ..data.datasets import N_TRAIN_MNIST, N_TRAIN_OMNIGLOT

    return {"mnist": N_TRAIN_MNIST, "fashion_mnist": N_TRAIN_MNIST,
            "binarized_mnist": N_TRAIN_MNIST, "colour_mnist": N_TRAIN_MNIST,
            "omniglot": N_TRAIN_OMNIGLOT}.get(name)


def check_data(cfg: ExperimentConfig) -> None:
    """Every file the data loader will read, present (fetched first when data.download) and
    matching its registered sha256, or the ingested store readable: a wrong data.root, a
    truncated .gz or a missing store is one message here, before a run folder or Ray exists."""
    if cfg.data.name == "store":
        if not cfg.data.store:
            return  # config.validate names the missing data.store
        from pathlib import Path

        from ..retrieval.store_ingest import ingested_fingerprint  # Zarr only for store runs

        if not Path(cfg.data.store).expanduser().exists():
            raise PreflightError(f"data.store={cfg.data.store} does not exist: ingest your "
                                 f"images into it first (python -m exvae_dist.ingest SOURCE "
                                 f"{cfg.data.store}), or fix the path")
        try:
            ingested_fingerprint(cfg.data.store)
        except (OSError, ValueError) as err:  # missing, half-written, foreign, unreadable
            raise PreflightError(f"data.store={cfg.data.store} cannot be used: {err}") from None
        return
    from ..data.datasets import required_files
    from ..data.download import ChecksumMismatchError, DataFileMissingError, ensure_file

    for remote, folder in required_files(cfg.data):
        try:
            ensure_file(remote, folder, download=cfg.data.download)
        except (DataFileMissingError, ChecksumMismatchError) as err:
            raise PreflightError(f"data.name={cfg.data.name}: {err}") from None


def check_index_shards(cfg: ExperimentConfig) -> None:
    """Refuses more index shards than a local Ray has CPUs: each shard is an actor process
    with its own FAISS threads, and 64 of them on 2 cores took 194 s to do what one does
    faster. A cluster given by ray.address is not judged here: its CPUs are known only once
    connected, and shards may sit on other nodes."""
    if cfg.ray.address or cfg.prior.kind != "exemplar" or not cfg.prior.rat:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cfg.index.shards > (cpus or 1):
        raise PreflightError(
            f"index.shards={cfg.index.shards}: one index actor per shard, but this machine "
            f"has {cpus} CPUs; set index.shards <= {cpus} (shards split an index that does "
            f"not fit one node's memory: one shard serves MNIST-sized stores best)")


def _store_rows(path) -> int | None:
    """The training images of an ingested store (read from its attributes), or None when it
    cannot be opened: the run folder's check names that problem."""
    from pathlib import Path

    from ..retrieval.store import ExemplarStore  # Zarr only for store runs

    try:
        return ExemplarStore(Path(path).expanduser()).n
    except (OSError, ValueError):
        return None


def warn_short_warmup(cfg: ExperimentConfig) -> None:
    """The KL weight beta rises linearly over train.warmup_epochs (objective.kl_beta): a run
    with fewer epochs than that ends before beta reaches 1, with an under-regularised model."""
    epochs, warmup = cfg.train.epochs, cfg.train.warmup_epochs
    if epochs and warmup > epochs:
        from ..core.objective import kl_beta

        log.warning("train.warmup_epochs=%d exceeds train.epochs=%d: the KL weight beta only "
                    "reaches %.2g in the last epoch instead of 1; set train.warmup_epochs<=%d",
                    warmup, epochs, kl_beta(epochs - 1, warmup), epochs)


def check_cluster(cfg: ExperimentConfig) -> None:
    """Refuses more workers than the connected Ray cluster can ever place.

    Reads ray.cluster_resources() (call after ray.init, before the trainer): a cluster
    without an autoscaler (a local Ray, a `ray start` cluster given by address) has all it
    will ever have, and Ray Train would wait for the rest (a minute per try, driver.py's
    CONTROLLER_RETRIES). With an autoscaler, which may add nodes, a shortfall is only warned
    about.
    """
    import ray

    have = ray.cluster_resources()
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    encoders = ""
    if cfg.prior.kind == "exemplar" and cfg.prior.rat and cfg.index.refresh_workers:
        need_cpu += cfg.index.refresh_workers * cfg.ray.cpus_per_worker
        encoders = (f" + index.refresh_workers={cfg.index.refresh_workers} x "
                    f"ray.cpus_per_worker={cfg.ray.cpus_per_worker:g}")
    where = (f"the cluster at {cfg.ray.address} (no autoscaler)" if cfg.ray.address
             else "this Ray (local, no autoscaler)")
    if (need_cpu > have.get("CPU", 0) or cfg.ray.use_gpu
            and cfg.ray.num_workers > have.get("GPU", 0)) and autoscaler_running():
        log.warning("the run needs %g CPUs%s and the cluster has %g CPUs, %g GPUs: it waits "
                    "for the autoscaler to add nodes (and fails after a few minutes without "
                    "them); lower ray.num_workers or ray.cpus_per_worker", need_cpu,
                    f" and {cfg.ray.num_workers} GPUs" if cfg.ray.use_gpu else "",
                    have.get("CPU", 0), have.get("GPU", 0))
        return
    if need_cpu > have.get("CPU", 0):
        raise PreflightError(
            f"ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker="
            f"{cfg.ray.cpus_per_worker:g}{encoders} need {need_cpu:g} CPUs, but {where} "
            f"has {have.get('CPU', 0):g}: the workers could never start. Lower "
            f"ray.num_workers or ray.cpus_per_worker, or add nodes")
    if cfg.ray.use_gpu and cfg.ray.num_workers > have.get("GPU", 0):
        raise PreflightError(
            f"ray.use_gpu=true with ray.num_workers={cfg.ray.num_workers}, but {where} has "
            f"{have.get('GPU', 0):g} GPUs: lower ray.num_workers or set ray.use_gpu=false")


def autoscaler_running() -> bool:
    """Whether the connected cluster has an autoscaler that may still add the nodes a run
    needs. v1's monitor publishes its report in the GCS; without an autoscaling config (a
    local Ray, `ray start`) its node provider is read-only and names each node's type after
    the node itself (node_<id>), while a launcher's (`ray up`) names the config's node types. v2 sets a
    flag."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = json.loads(_internal_kv_get("__autoscaling_status") or b"{}")
        types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
        v2 = _internal_kv_get("__autoscaler_v2_enabled", namespace="__autoscaler")
        return (any(v != f"node_{k}" for k, v in types.items())
                or v2 not in (None, b"", b"0", b"false"))
    except Exception:  # an API that moved: assume one, and only warn
        return True
