"""The driver of a distributed run: Ray connection, exemplar store, index service, TorchTrainer.

    summary = run(cfg)   # trains (or resumes) cfg.run_path() on Ray; returns the last epoch

Ray Train keeps its checkpoints under the run folder (storage_path = the run folder's parent,
name = cfg.run_name()), so rerunning the same command finds them and resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional


from .. import config as config_mod
from ..runs import run_folder
from ..runs.tracking import probe
from ..data import DataSplits, load_dataset
from ..core.objective import build_model
from ..core.candidates import query_depth, subset_size
from ..retrieval.exemplar_images import ensure_store, open_exemplar_store, to_bytes
from ..runs import preflight  # hook: issue16
from ..runs.run_lock import exclusive_run  # hook: issue16

log = logging.getLogger(__name__)


def connect(cfg: config_mod.ExperimentConfig) -> bool:
    """Connects to cfg.ray.address, or starts a local Ray on 127.0.0.1 when there is none.

    Returns True when this call started Ray (the caller may shut it down). An already
    initialised Ray (a test, a notebook) is used as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    if cfg.ray.address:
        log.info("connecting to the Ray cluster at %s", cfg.ray.address)
        ray.init(address=cfg.ray.address)
        return True
    log.info("no Ray address given: starting a local Ray on 127.0.0.1")
    # Ray Train's preemption watcher (an actor with max_restarts=-1, announced by a red
    # core_worker line) watches for draining spot nodes; a local Ray has none
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1")
    return True


def index_actor_name(cfg: config_mod.ExperimentConfig) -> str:
    """The index service's actor name (one service per run)."""
    return f"exvae-index-{cfg.run_name()}"


def index_config(cfg: config_mod.ExperimentConfig, n: int) -> config_mod.IndexConfig:
    """cfg.index with auto_recall_k filled in: kind=auto calibrates its nprobe for the depth
    the workers search (RAT's k'), not for a fixed 10."""
    if cfg.index.auto_recall_k is not None:
        return cfg.index
    depth = query_depth(cfg.prior.k, n, subset_size(n, cfg.prior.subsample), cfg.prior.safety)
    return dataclasses.replace(cfg.index, auto_recall_k=depth)


def store_path(cfg: config_mod.ExperimentConfig) -> Path:
    """index.store_path, else the ingested store itself (data.name=store: its images are
    read where they are, its latent versions are written beside them), else
    <run folder>/store.zarr."""
    if cfg.index.store_path:
        return Path(cfg.index.store_path).expanduser().resolve()
    if cfg.data.name == "store":
        return Path(cfg.data.store).expanduser().resolve()
    return cfg.run_path() / "store.zarr"


def absolute(cfg: config_mod.ExperimentConfig) -> config_mod.ExperimentConfig:
    """The same config with every path absolute: workers may run in another folder (a job's
    working dir, another node)."""
    d = config_mod.to_dict(cfg)
    d["train"]["run_dir"] = str(cfg.run_path().parent)
    d["index"]["store_path"] = str(store_path(cfg))
    if cfg.data.root:
        d["data"]["root"] = str(Path(cfg.data.root).expanduser().resolve())
    return config_mod.from_dict(d)


def check_resources(cfg: config_mod.ExperimentConfig) -> None:
    """Warns when the cluster (as it is now) cannot place the workers."""
    import ray

    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if cfg.prior.rat:
        need += cfg.index.refresh_workers * cfg.index.refresh_cpus
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        log.warning("%d workers x %s CPUs need %s CPUs but the cluster has %s: the run waits "
                    "for an autoscaler (or forever); lower ray.num_workers or "
                    "ray.cpus_per_worker", cfg.ray.num_workers, cfg.ray.cpus_per_worker,
                    need, have)
    if cfg.ray.use_gpu and ray.cluster_resources().get("GPU", 0) < cfg.ray.num_workers:
        log.warning("ray.use_gpu=true but the cluster has %s GPUs for %d workers",
                    ray.cluster_resources().get("GPU", 0), cfg.ray.num_workers)


def make_trainer(cfg: config_mod.ExperimentConfig, splits: DataSplits, service=None,
                 encoders=None):
    """The TorchTrainer of a run (gloo on CPU, NCCL on GPU: TorchConfig's default)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..retrieval.service import placement_strategy  # hook: issue12
    from .failures import StopOnKnownError
    from .worker import train_loop_per_worker

    run = cfg.run_path()
    loop_config = {
        "config": config_mod.to_dict(cfg),
        "run_path": str(run),
        "store_path": str(store_path(cfg)),
        "service": service,
        "encoders": encoders,  # index.refresh_workers RefreshEncoder actors, or None
        # validation images are binary: bytes through the object store, a quarter the size
        "valid": ray.put(to_bytes(splits.valid_x)),
        "dynamic": splits.dynamic,
        "image_shape": list(splits.image_shape),
    }
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=placement_strategy()),  # hook: issue12
        run_config=RunConfig(
            name=cfg.run_name(),
            storage_path=str(run.parent),  # absolute; the same name resumes its checkpoints
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures,
                                         controller_failure_limit=cfg.ray.controller_failure_limit),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints),
            callbacks=[StopOnKnownError()],  # a deterministic error is not retried
        ),
    )


@exclusive_run  # hook: issue16 (preflight, run lock, orphan sweep)
def run(cfg: config_mod.ExperimentConfig, splits: Optional[DataSplits] = None) -> dict:
    """Trains (or resumes) the run cfg.run_path() with Ray Train; returns the final summary.

    Starts the index service for RAT (named index_actor_name(cfg)) and stops it at the end.
    """
    import ray

    config_mod.check_trainer_keys(cfg, "ray")
    if cfg.train.batch_size < cfg.ray.num_workers:
        raise config_mod.ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch, split over "
            f"ray.num_workers={cfg.ray.num_workers} workers: make it at least as large")
    # deterministic refusals before Ray starts: a changed run, a job's temporary folder,
    # a tracking server that does not answer
    if cfg.tracking.enabled:
        probe(cfg.tracking.uri)
    run_folder.prepare(cfg)
    started = connect(cfg)
    cfg = absolute(cfg)
    run_path = cfg.run_path()

    # an ingested store's N training images stay on disk: the driver holds none of them
    splits = splits or load_dataset(cfg.data, train_in_memory=cfg.data.name != "store")
    latent_dim = build_model(cfg, splits.image_shape).net.top_dim
    if splits.train_x is None:
        store = open_exemplar_store(store_path(cfg), latent_dim)
    else:
        store = ensure_store(store_path(cfg), splits.train_x, splits.image_shape, latent_dim)
    check_resources(cfg)
    preflight.check_cluster(cfg)  # hook: issue16

    service = None
    if cfg.prior.kind == "exemplar" and cfg.prior.rat:
        from ..retrieval.service import start_index_shards  # hook: issue12

        service = start_index_shards(str(store_path(cfg)), index_config(cfg, store.n),
                                     name=index_actor_name(cfg))  # a list of cfg.index.shards
    encoders = None
    if service is not None and cfg.index.refresh_workers:
        from .refresh_actors import start_refresh_encoders

        encoders = start_refresh_encoders(str(store_path(cfg)), config_mod.to_dict(cfg),
                                          splits.image_shape, cfg.index.refresh_workers,
                                          cfg.index.refresh_cpus)
    try:
        result = make_trainer(cfg, splits, service, encoders).fit()
    finally:
        for handle in [*(service or []), *(encoders or [])]:  # hook: issue12
            ray.kill(handle)
        if started:
            ray.shutdown()
    if result.error is not None:
        raise result.error
    summary_file = run_path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return summary or dict(result.metrics or {})
