"""The driver of a distributed run: Ray connection, exemplar store, index service, TorchTrainer.

    summary = run(cfg)   # trains (or resumes) cfg.run_path() on Ray; returns the last epoch

Ray Train keeps its checkpoints under the run folder (storage_path = the run folder's parent,
name = cfg.run_name()), so rerunning the same command finds them and resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional


from .. import config as config_mod
from ..runs import run_folder
from ..common.errors import find_known
from ..common.ports import free_loopback_port
from ..runs.checkpoint import describe_resume, resume_point
from ..runs.tracking import MlflowTracker, end_run_of, probe
from ..data import DataSplits, load_dataset
from ..core.objective import build_model
from ..core.cache import ACTORS, WORKER, placement
from ..core.candidates import query_depth, subset_size
from ..common.levels import to_bytes
from ..retrieval.exemplar_images import ensure_store, open_exemplar_store
from ..runs import preflight
from ..runs.run_lock import StoreWriterLock, exclusive_run

log = logging.getLogger(__name__)

# Worker-group starts that time out (Ray Train waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
# 60 s, for each) before the run fails: a node lost with no spare capacity left fails in
# ~4 min with WorkersUnplaceable instead of retrying every minute forever (Ray's default);
# an autoscaler has these minutes to add a node.
CONTROLLER_RETRIES = 3
# Ray Train checkpoints kept on storage: the newest and the one before it (Ray keeps every
# one otherwise, and a run of thousands of epochs would fill the disk)
KEEP_CHECKPOINTS = 2
# where Ray's state API clients (Ray Train's PlacementGroupCleaner among them) look first
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


class WorkersUnplaceable(preflight.PreflightError):
    """Ray could not start the run's workers in CONTROLLER_RETRIES + 1 tries (a node lost,
    the cluster busy); the message names the capacity and where a rerun resumes."""


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
    port = free_loopback_port()
    context = start_local_ray(f"http://127.0.0.1:{port}", include_dashboard=True,
                              dashboard_host="127.0.0.1", dashboard_port=port)
    if context.dashboard_url != f"127.0.0.1:{port}":
        # ray.init joined a Ray that was already running here (`ray start` made one), whose
        # processes did not get the variable
        log.info("joined the Ray already running on this machine (dashboard %s)",
                 context.dashboard_url)
    return True


@contextlib.contextmanager
def state_api_of_started_processes(url: str):
    """RAY_API_SERVER_ADDRESS=url while the block starts Ray: the processes ray.init starts
    inherit it (Ray Train's PlacementGroupCleaner among them), this one does not keep it
    (`ray job submit --address` would obey it too). See start_local_ray()."""
    before = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = before


def start_local_ray(state_api_url: str, **init_kwargs):
    """ray.init of a Ray on 127.0.0.1 whose processes find their state API at state_api_url,
    with the settings every local Ray gets (connect(), the tests, the benches):

    - Ray Train's preemption watcher (an actor with max_restarts=-1, announced by a red
      core_worker line) watches for draining spot nodes, and a local Ray has none. It is one
      more process waking every 10 ms beside a worker that wants every core (bench/README.md,
      "What the 2-thread Ray worker pays"). Set in this process: Ray Train passes it from
      the driver to its controller.
    - Ray Train's PlacementGroupCleaner asks the state API every second whether the run's
      controller is alive, and finds that API through the cluster the last `ray start` on
      this machine made when nothing says otherwise: a `ray start` during a local run pointed
      it at a cluster without that controller, and it removed the run's placement group
      (tests/test_local_ray.py). The processes ray.init starts inherit state_api_url.
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    with state_api_of_started_processes(state_api_url):
        return ray.init(_node_ip_address="127.0.0.1", **init_kwargs)


def start_local_ray_without_dashboard(num_cpus: int, **kwargs):
    """A local Ray on 127.0.0.1 without a dashboard, for the tests and benches. Without a
    dashboard there is no state API, so its processes get an address nobody serves: the
    PlacementGroupCleaner then only retries, where unpointed it would ask another Ray on the
    machine and remove this one's placement groups (see start_local_ray())."""
    return start_local_ray("http://127.0.0.1:1", address="local", num_cpus=num_cpus,
                           include_dashboard=False, **kwargs)


def index_actor_name(cfg: config_mod.ExperimentConfig) -> str:
    """The index service's actor name (one service per run)."""
    return f"exvae-index-{cfg.run_name()}"


def recall_depth(cfg: config_mod.ExperimentConfig, n: int) -> int:
    """The depth the workers search the index actors at (RAT's k'), which kind=auto
    calibrates its nprobe for instead of a fixed 10."""
    # the sampler asks for the k + 1 nearest of the step's subset (core/cache.py)
    return query_depth(cfg.prior.k + 1, n, subset_size(n, cfg.prior.subsample),
                       cfg.prior.safety)


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


def interruptible(trainer_cls):
    """trainer_cls whose fit() turns Ctrl-C into KeyboardInterrupt, as the one-process
    trainer's does (exit 130 at the command line), after aborting the workers.

    Ray Train's own SIGINT handler aborts the controller and then exits with status 1, the
    run's MLflow run left RUNNING; this one aborts the controller the same way (the workers
    are stopped, the last checkpoint stays) and raises KeyboardInterrupt, so the driver
    marks the MLflow run KILLED and the command line says where a rerun resumes. A second
    Ctrl-C while aborting interrupts at once.
    """
    import ray

    class Interruptible(trainer_cls):
        def _register_sigint_handler(self, controller):
            def on_sigint(signum, frame):
                signal.signal(signal.SIGINT, signal.default_int_handler)
                log.info("Ctrl-C: stopping the workers (the last checkpoint is kept)")
                try:
                    ray.get(controller.abort.remote(), timeout=60)
                except Exception:  # the controller exits as it aborts
                    pass
                raise KeyboardInterrupt
            signal.signal(signal.SIGINT, on_sigint)

    Interruptible.__name__ = trainer_cls.__name__
    return Interruptible


def unplaceable(cfg: config_mod.ExperimentConfig,
                error: BaseException) -> Optional[WorkersUnplaceable]:
    """A WorkersUnplaceable for a run that ended because its workers could not be placed
    (call while still connected), else None."""
    import ray
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    if not (isinstance(error, ControllerError) and isinstance(
            getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError)):
        return None
    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    return WorkersUnplaceable(
        f"Ray could not start the {cfg.ray.num_workers} workers ({need:g} CPUs) in "
        f"{CONTROLLER_RETRIES + 1} tries: the cluster has {have:g} CPUs now (a node lost, or "
        f"busy with other work). The checkpoints are kept: rerun the same command to resume "
        f"{describe_resume(cfg.run_path())} once the cluster has the capacity, or with a "
        f"lower ray.num_workers")


def make_trainer(cfg: config_mod.ExperimentConfig, splits: DataSplits, service=None,
                 encoders=None, where: str = WORKER):
    """The TorchTrainer of a run (gloo on CPU, NCCL on GPU: TorchConfig's default)."""
    import ray
    from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig, RunConfig,
                           ScalingConfig)
    from ray.train.torch import TorchTrainer

    from ..retrieval.service import placement_strategy
    from .failures import StopOnKnownError
    from .worker import train_loop_per_worker

    run = cfg.run_path()
    loop_config = {
        "config": config_mod.to_dict(cfg),
        "run_path": str(run),
        "store_path": str(store_path(cfg)),
        "service": service,
        "encoders": encoders,  # index.refresh_workers RefreshEncoder actors, or None
        "placement": where,  # of the exemplar cache: in each worker, or in the index actors
        "terminal": sys.stderr.isatty(),  # progress drawn in place, or as plain lines
        # validation images are binary: bytes through the object store, a quarter the size
        "valid": ray.put(to_bytes(splits.valid_x)),
        "dynamic": splits.dynamic,
        "image_shape": list(splits.image_shape),
    }
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    return interruptible(TorchTrainer)(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=placement_strategy()),
        run_config=RunConfig(
            name=cfg.run_name(),
            storage_path=str(run.parent),  # absolute; the same name resumes its checkpoints
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures,
                                         controller_failure_limit=CONTROLLER_RETRIES),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            # Ray Train's INFO lines (its resources, each checkpoint's path, and on every
            # resume "configure a new, unique RunConfig(name) or delete the existing
            # folder", the opposite of what a rerun here is for) stay in Ray's log files;
            # the driver and rank 0 say what matters
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[StopOnKnownError()],  # a deterministic error is not retried
        ),
    )


@exclusive_run  # preflight, run lock, orphan sweep
def run(cfg: config_mod.ExperimentConfig, splits: Optional[DataSplits] = None) -> dict:
    """Trains (or resumes) the run cfg.run_path() with Ray Train; returns the final summary.

    Starts the index service for RAT (named index_actor_name(cfg)) and stops it at the end.
    """
    config_mod.check_trainer_keys(cfg, "ray")
    if cfg.train.batch_size < cfg.ray.num_workers:
        raise config_mod.ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch, split over "
            f"ray.num_workers={cfg.ray.num_workers} workers: make it at least as large")
    # deterministic refusals before Ray starts: a changed run, a job's temporary folder,
    # a tracking server that does not answer, a store another run writes into
    if cfg.tracking.enabled:
        probe(cfg.tracking.uri)
    with store_writer(cfg):
        run_folder.prepare(cfg)
        try:
            if cfg.tracking.enabled:  # the MLflow run exists before Ray: a failed start shows
                MlflowTracker(cfg.run_path(), cfg.tracking.uri, cfg.tracking.experiment,
                              cfg.run_name())
            return train_on_ray(cfg, splits)
        except BaseException as exc:  # FAILED, or KILLED for Ctrl-C (which aborts the
            if cfg.tracking.enabled:  # workers before their tracker can say so)
                end_run_of(cfg.run_path(), exc)
            raise


def store_writer(cfg: config_mod.ExperimentConfig):
    """The lock of the run's exemplar store (its latent versions have one training writer)
    when the store lives outside the run folder, whose own lock covers the one inside."""
    path = store_path(cfg)
    if path.is_relative_to(cfg.run_path().resolve()):
        return contextlib.nullcontext()
    return StoreWriterLock(path)


def train_on_ray(cfg: config_mod.ExperimentConfig, splits: Optional[DataSplits]) -> dict:
    """run()'s work once its inputs and locks are settled: Ray, the store, the index
    service and the TorchTrainer."""
    import ray

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
    preflight.check_cluster(cfg)

    where = placement(cfg.index, store.n, cfg.prior.rat)
    log.info("exemplar cache: %s (%d exemplars)", "searched in each worker" if where == WORKER
             else f"served by {cfg.index.shards} index actor(s)", store.n)
    service = None
    if cfg.prior.kind == "exemplar" and cfg.prior.rat and where == ACTORS:
        from ..retrieval.service import start_index_shards

        service = start_index_shards(str(store_path(cfg)), cfg.index,
                                     name=index_actor_name(cfg),  # a list of cfg.index.shards
                                     recall_k=recall_depth(cfg, store.n))
    encoders = None
    if service is not None and cfg.index.refresh_workers:
        from .refresh_actors import start_refresh_encoders

        encoders = start_refresh_encoders(str(store_path(cfg)), config_mod.to_dict(cfg),
                                          splits.image_shape, cfg.index.refresh_workers,
                                          cfg.ray.cpus_per_worker)
    point = resume_point(run_path)
    if point is not None:
        log.info("resuming %s from epoch %d step %d", run_path, *point)
    try:
        try:
            result = make_trainer(cfg, splits, service, encoders, where).fit()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # fit raises the run's error: say it the clear way
            clear = find_known(err) or unplaceable(cfg, err)
            if clear is None:
                raise
            raise clear from None
    finally:
        for handle in [*(service or []), *(encoders or [])]:
            ray.kill(handle)
        if started:
            ray.shutdown()
    summary_file = run_path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return summary or dict(result.metrics or {})
