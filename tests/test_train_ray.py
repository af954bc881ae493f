"""The Ray trainer: its step is the one-process step, it trains on 2 workers with a refreshing
index, survives an index crash, resumes, and runs as a `ray job submit` job."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from exvae_dist import config as config_mod
from exvae_dist.core import loop
from exvae_dist.runs.checkpoint import load_checkpoint
from exvae_dist.data import load_dataset
from exvae_dist.core.group import Group
from exvae_dist.retrieval.exemplar_images import ensure_store
from exvae_dist.train.refresh import StoreLatents
from exvae_dist.train.store_images import StoreImages
from exvae_dist.train.service_client import ServiceSearch
from exvae_dist.train.worker import build_parts
from exvae_dist.core.cache import ACTORS, WORKER, placement

REPO = Path(__file__).resolve().parent.parent


def smoke(data_dir, tmp_path, *extra):
    return config_mod.load("smoke", [f"train.run_dir={tmp_path}", "train.progress=false",
                                     *extra],
                           env={"EXVAE_DATA_DIR": str(data_dir)})


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_while(killer: threading.Thread, cfg) -> dict:
    """driver.run(cfg) with `killer` (a thread with a `stop` event) watching it."""
    from exvae_dist.train.driver import run

    killer.start()
    try:
        return run(cfg)
    finally:
        killer.stop.set()
        killer.join(30)


# ------------------------------------------------ (a) the loop on Ray is the one-process loop

class NoCheckpoints:
    """A sink outside a Ray Train session: a fresh start, nothing saved."""

    def load(self):
        return None

    def save(self, state, improved, metrics):
        pass


def one_epoch(parts):
    """An epoch of the loop as fit runs it, without checkpoints (no Ray Train session here)."""
    from exvae_dist.runs.recorder import NullRecorder

    parts.sink, parts.recorder = NoCheckpoints(), NullRecorder()
    state, sampler, _ = loop.start(parts)
    summary = loop.run_epoch(parts, state, sampler)
    return state, summary


@pytest.mark.parametrize("where", [WORKER, ACTORS])
def test_one_worker_epoch_equals_one_process_epoch(tmp_path, data_dir, ray_local, where):
    """The Ray worker's parts in a 1-rank gloo group, with the exemplar cache in the worker
    (the default below index.auto_exact_below) or served by an index actor that each refresh
    waits for: the same steps, candidates, versions and weights as the one-process trainer."""
    import torch.distributed as dist

    from exvae_dist.retrieval.service import start_index_service
    from exvae_dist.train.local import build_parts as one_process_parts

    cfg = smoke(data_dir, tmp_path, "data.n_train=1000", "data.n_valid=100",
                "train.max_steps_per_epoch=3", "tracking.enabled=false",
                "tracking.sample_grid=false", "prior.refresh_every=2", "ray.resident_mb=0",
                *(("index.kind=flat",) if where == ACTORS else ()))
    assert placement(cfg.index, 1000, rat=True) == where
    splits = load_dataset(cfg.data)
    defaults = config_mod.to_dict(config_mod.ExperimentConfig())
    # the one-process trainer has no index and no Ray: those sections at their defaults
    one_cfg = config_mod.from_dict({**config_mod.to_dict(cfg), "index": defaults["index"],
                                    "ray": defaults["ray"]})
    state_a, summary_a = one_epoch(one_process_parts(one_cfg, splits))

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    handle = None
    try:
        store = ensure_store(tmp_path / "store.zarr", splits.train_x, splits.image_shape,
                             state_a.model.net.top_dim)
        if where == ACTORS:
            handle = start_index_service(str(store.path), cfg.index)
        parts = build_parts(cfg, tmp_path / "ray", store, torch.from_numpy(splits.valid_x),
                            splits.dynamic, splits.image_shape,
                            ServiceSearch(handle) if handle else None, Group.current(),
                            where=where)
        parts.cache.serve_every_version = where == ACTORS
        assert parts.wrapped is parts.model  # a world of one rank: no DDP copy of gradients
        # ray.resident_mb=0: images read from the store by id
        assert parts.train_images.resident is None
        state_b, summary_b = one_epoch(parts)
        # the actors' means are streamed from the store in blocks; the worker holds them
        assert isinstance(parts.cache.centres(), StoreLatents if where == ACTORS
                          else torch.Tensor)
    finally:
        dist.destroy_process_group()
        if handle is not None:
            ray_local.kill(handle)

    # the same steps, candidates and refreshes (versions 1-3), the same weights
    assert summary_b["index_version"] == summary_a["index_version"] == 3
    assert summary_b["train_candidates"] == summary_a["train_candidates"] > 0
    assert summary_b["train_loss"] == pytest.approx(summary_a["train_loss"], rel=1e-6)
    assert summary_b["val_elbo"] == pytest.approx(summary_a["val_elbo"], rel=1e-6)
    for p_a, p_b in zip(state_a.model.parameters(), state_b.model.parameters()):
        torch.testing.assert_close(p_b, p_a, rtol=1e-5, atol=1e-6)


# ----------------------------------- (b) + (c) + resume: two workers, a crashing index, resume

class IndexKiller(threading.Thread):
    """Kills the run's index actor once it serves `after_version`; records what it saw."""

    def __init__(self, name, after_version):
        super().__init__(daemon=True)
        self.name_, self.after_version = name, after_version
        self.before = self.after = None
        self.stop = threading.Event()

    def run(self):
        import ray

        actor = None
        while not self.stop.is_set():
            try:
                actor = actor or ray.get_actor(self.name_)
                status = ray.get(actor.status.remote(), timeout=10)
            except Exception:  # not started yet
                time.sleep(0.02)
                continue
            if (status["version"] or 0) >= self.after_version:
                self.before = status
                ray.kill(actor, no_restart=False)  # a crash: Ray restarts the actor
                break
            time.sleep(0.01)
        # ray.kill is asynchronous: wait for the restarted actor (its query count starts over)
        deadline = time.monotonic() + 60
        while actor is not None and not self.stop.is_set() and time.monotonic() < deadline:
            try:
                status = ray.get(actor.status.remote(), timeout=10)
            except Exception:  # dead or restarting
                time.sleep(0.05)
                continue
            if status["queries_served"] < self.before["queries_served"]:
                self.after = status
                return
            time.sleep(0.02)


def test_two_workers_train_survive_index_crash_and_resume(tmp_path, data_dir, ray_local):
    from mlflow.tracking import MlflowClient

    from exvae_dist.train.driver import index_actor_name, run

    args = ("data.n_train=2000", "data.n_valid=300", "ray.num_workers=2", "ray.max_failures=0",
            "prior.refresh_every=4", "train.log_every=1", "index.kind=flat")
    cfg = smoke(data_dir, tmp_path, *args)
    killer = IndexKiller(index_actor_name(cfg), after_version=3)
    summary = run_while(killer, cfg)

    run_path = cfg.run_path()
    recs = records(run_path)
    steps = [r for r in recs if "loss" in r]
    epochs = [r for r in recs if "val_elbo" in r]
    assert summary["epoch"] == 2 and summary["step"] == 40  # 2000 images, global batch 100
    assert [r["step"] for r in steps] == list(range(1, 41))
    # the loss falls
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert np.mean([r["loss"] for r in steps[-5:]]) < np.mean([r["loss"] for r in steps[:5]])
    # the index version advances within the first epoch (refresh every 4 steps), never goes
    # back, and is never older than a few refreshes
    first_epoch_versions = [r["index_version"] for r in steps if r["epoch"] == 0]
    assert len(set(first_epoch_versions)) >= 3
    assert all(b >= a for a, b in zip(first_epoch_versions, first_epoch_versions[1:]))
    assert max(r["staleness"] for r in steps) < 4 * cfg.prior.refresh_every
    assert all(r["candidates"] > 0 for r in steps)

    # (c) the index actor was killed mid-run and came back (fresh query count); training went on
    assert killer.before is not None, "the index actor was never killed"
    assert killer.after is not None, "the killed index actor did not come back"
    assert max(r["index_version"] for r in steps) > killer.before["version"]

    # MLflow: one run with step metrics, validation, sample grids, config and best checkpoint
    info = json.loads((run_path / "mlflow_run.json").read_text())
    client = MlflowClient(info["uri"])
    mlrun = client.get_run(info["run_id"])
    for key in ("loss", "kl", "index_version", "staleness", "examples_per_second", "val_elbo",
                "short_rows", "log_var", "beta"):
        assert key in mlrun.data.metrics, key
    assert mlrun.data.params["ray.num_workers"] == "2"
    assert len(client.get_metric_history(info["run_id"], "loss")) == 40
    samples = [a.path for a in client.list_artifacts(info["run_id"], "samples")]
    assert samples == ["samples/epoch_0001.png", "samples/epoch_0002.png"]
    top = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"config.yaml", "checkpoints"} <= top

    # rerunning the same command with one more epoch resumes at step 40, same MLflow run
    again = run(smoke(data_dir, tmp_path, *args, "train.epochs=3"))
    assert again["epoch"] == 3 and again["step"] == 60
    recs = records(run_path)
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 61))
    assert [r["epoch"] for r in recs if "val_elbo" in r] == [1, 2, 3]
    assert json.loads((run_path / "mlflow_run.json").read_text())["run_id"] == info["run_id"]
    assert len(client.get_metric_history(info["run_id"], "val_elbo")) == 3


def test_a_ray_run_refused_before_training_is_failed_in_mlflow_and_no_experiment_is_temporary(
        tmp_path, data_dir, ray_local):
    """The driver opens the MLflow run before Ray's work: a run that stops before training
    (here: more workers than the 2-CPU Ray can place) is there, FAILED with an end time; the
    store's experiments (MLflow's "Default" too) keep artifacts under train.run_dir, not in
    the current folder of whichever process created the store (a Ray worker's is temporary)."""
    from mlflow.tracking import MlflowClient

    from exvae_dist.runs.preflight import PreflightError
    from exvae_dist.train.driver import run

    cfg = smoke(data_dir, tmp_path, "data.n_train=300", "data.n_valid=100",
                "ray.num_workers=5")
    with pytest.raises(PreflightError, match="need 5 CPUs"):
        run(cfg)
    info = json.loads((cfg.run_path() / "mlflow_run.json").read_text())
    client = MlflowClient(info["uri"])
    failed = client.get_run(info["run_id"]).info
    assert failed.status == "FAILED" and failed.end_time, failed
    roots = {e.name: e.artifact_location for e in client.search_experiments()}
    assert set(roots) == {"Default", "exvae-dist"}, roots
    assert all(root.startswith((tmp_path / "mlartifacts").as_uri()) for root in roots.values())


# ------------------------------------------- a worker dies mid-epoch: restart from the checkpoint

def cmdline(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):  # gone meanwhile
        return []


class WorkerKiller(threading.Thread):
    """SIGKILLs one of this process's Ray Train workers once metrics.jsonl shows a step of `epoch`."""

    def __init__(self, metrics: Path, epoch: int):
        super().__init__(daemon=True)
        self.metrics, self.epoch = metrics, epoch
        self.killed_at = None  # the last logged step when the worker was killed
        self.stop = threading.Event()

    def run(self):
        import psutil

        while not self.stop.is_set():
            steps = []
            if self.metrics.is_file():
                for line in self.metrics.read_text().splitlines():
                    try:
                        steps.append(json.loads(line))
                    except json.JSONDecodeError:  # a line being written
                        pass
            steps = [r for r in steps if "loss" in r and r["epoch"] == self.epoch]
            if steps:
                # only this test's own Ray (started by this process): a machine-wide match
                # also SIGKILLed the workers of other Ray runs on the box (another pytest, a
                # bench), whose runs then failed with their placement group removed
                workers = [p for p in psutil.Process().children(recursive=True)
                           if "RayTrainWorker" in " ".join(cmdline(p))]
                if workers:
                    workers[-1].send_signal(signal.SIGKILL)
                    self.killed_at = steps[-1]["step"]
                    return
            time.sleep(0.05)


def test_a_killed_worker_restarts_from_the_last_checkpoint(tmp_path, data_dir, ray_local):
    cfg = smoke(data_dir, tmp_path, "data.n_train=1000", "data.n_valid=200", "ray.num_workers=2",
                "ray.max_failures=1", "train.log_every=1", "index.kind=flat",
                "prior.refresh_every=3")
    killer = WorkerKiller(cfg.run_path() / "metrics.jsonl", epoch=1)
    summary = run_while(killer, cfg)

    assert killer.killed_at is not None and 10 < killer.killed_at < 20, killer.killed_at
    # the run finished both epochs; epoch 2 was trained again from the epoch-1 checkpoint,
    # and the dead attempt's records were dropped, so every step appears exactly once
    assert summary["epoch"] == 2 and summary["step"] == 20
    recs = records(cfg.run_path())
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 21))
    assert [r["epoch"] for r in recs if "val_elbo" in r] == [1, 2]
    assert np.isfinite(summary["val_elbo"])


# (d) `ray job submit` to a loopback head: the README's job block, run as written by
# tests/test_readme.py (ray start --head, job submit with the venv's python, ray stop)


# ------------------------------------------------------------------------ small, no Ray

def test_store_of_another_training_set_is_refused(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (300, 784)).astype(np.float32) / 255
    store = ensure_store(tmp_path / "s.zarr", x, (1, 28, 28), latent_dim=8)
    assert store.chunk_rows * 4 <= store.n  # several chunks, so several writers
    assert torch.equal(StoreImages(store)[np.arange(300)], torch.from_numpy(x))
    ensure_store(tmp_path / "s.zarr", x, (1, 28, 28), latent_dim=8)  # the same set: reopened
    with pytest.raises(ValueError, match="does not belong to this run"):
        ensure_store(tmp_path / "s.zarr", x[:200], (1, 28, 28), latent_dim=8)
    with pytest.raises(ValueError, match="latent size"):
        ensure_store(tmp_path / "s.zarr", x, (1, 28, 28), latent_dim=4)
    with pytest.raises(ValueError, match="images differ"):
        ensure_store(tmp_path / "s.zarr", 1 - x, (1, 28, 28), latent_dim=8)


def test_a_second_run_on_a_store_in_use_is_refused_before_ray(tmp_path, monkeypatch):
    """A store's latent versions have one training writer: a run on an ingested store that
    another live run holds stops with a message naming the store and the holder, before
    Ray or any data; the store is left as it was."""
    from types import SimpleNamespace

    from exvae_dist.data import ingest as ingest_mod
    from exvae_dist.retrieval.store import ExemplarStore
    from exvae_dist.runs.run_lock import StoreLocked
    from exvae_dist.train import driver

    x = np.random.default_rng(0).integers(0, 256, (120, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    args = SimpleNamespace(labels=None, images_key=None, labels_key=None, data_root=None, seed=0)
    store = tmp_path / "s"
    ingest_mod.ingest(ingest_mod.open_source(str(tmp_path / "x.npy"), args), store,
                      n_valid=10, n_test=10, progress=False, latent_dim=40)
    before = sorted(p.name for p in store.rglob("*"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from exvae_dist.runs.run_lock import StoreWriterLock\n"
         "StoreWriterLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
         str(store)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(driver, "connect", lambda cfg: pytest.fail("Ray was started"))
        cfg = config_mod.load("smoke", [f"train.run_dir={tmp_path / 'runs'}", "data.name=store",
                                        f"data.store={store}", "data.n_train=null",
                                        "data.n_valid=null", "data.n_test=null"], env={})
        with pytest.raises(StoreLocked, match=f"exemplar store {store} is in use by another "
                                              f"training run \\(pid {holder.pid} "):
            driver.run(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in store.rglob("*")) == before
    assert ExemplarStore(store).versions() == []


def test_help_lists_the_config_keys():
    out = subprocess.run([sys.executable, "-m", "exvae_dist.train", "--help"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    assert "ray.num_workers=1" in out.stdout and "--no-ray" in out.stdout


@pytest.mark.parametrize("prior", ["gaussian", "vampprior"])
def test_ddp_worker_steps_with_the_other_priors(tmp_path, data_dir, prior):
    """Two DDP steps (DDP fails at the second one if a parameter got no gradient)."""
    import torch.distributed as dist

    cfg = smoke(data_dir, tmp_path, "data.n_train=300", f"prior.kind={prior}",
                "prior.n_pseudo=20", "train.max_steps_per_epoch=2", "tracking.enabled=false",
                "tracking.sample_grid=false")
    splits = load_dataset(cfg.data)
    store = ensure_store(tmp_path / "store.zarr", splits.train_x, splits.image_shape, 40)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        parts = build_parts(cfg, tmp_path, store, torch.from_numpy(splits.valid_x),
                            splits.dynamic, splits.image_shape, None, Group.current())
        assert parts.cache is None
        state, summary = one_epoch(parts)
    finally:
        dist.destroy_process_group()
    assert state.step == 2 and np.isfinite(summary["train_loss"])


def test_one_worker_resumed_run_equals_an_uninterrupted_one(tmp_path, data_dir, ray_local):
    """Ray with 1 worker (the exemplar cache in the worker, the default at this N): 1 epoch +
    resume = 2 epochs, to the last bit; index.store_path puts the exemplar store where it
    says."""
    from exvae_dist.train.driver import run

    common = ("data.n_train=600", "data.n_valid=100", "train.log_every=1",
              "prior.refresh_every=2", "tracking.enabled=false", "tracking.sample_grid=false")
    run(smoke(data_dir, tmp_path, "train.name=whole", *common))
    store = tmp_path / "elsewhere" / "store.zarr"
    parts = ("train.name=parts", f"index.store_path={store}", *common)
    run(smoke(data_dir, tmp_path, *parts, "train.epochs=1"))
    summary = run(smoke(data_dir, tmp_path, *parts))
    assert summary["epoch"] == 2 and summary["step"] == 12
    assert (store / "zarr.json").is_file() and not (tmp_path / "parts" / "store.zarr").exists()
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for i, slot in a["optimizer"]["state"].items():
        for name, value in slot.items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), (i, name)
    drop = ("train_seconds", "epoch_seconds", "refresh_seconds", "refresh_share",
            "train_thread_cpu_share",
            "examples_per_second",
            "step_ms_steady", "step_ms_during_rebuild", "steps_during_rebuild")
    ra = [{k: v for k, v in r.items() if k not in drop} for r in records(tmp_path / "whole")]
    rb = [{k: v for k, v in r.items() if k not in drop} for r in records(tmp_path / "parts")]
    assert len(ra) == 14 and ra == rb


# ------------------------------------- (e) an ingested store is the data path of a Ray run

def test_ray_run_reads_an_ingested_store_in_place_and_evaluates_on_its_test_split(
        tmp_path, data_dir, ray_local, monkeypatch):
    """data.name=store on Ray: the driver loads no training image (train_x None), the workers
    read rows by id from the ingested store (ray.resident_mb=0) and write their latent
    versions into it, validation streams the centres from it, and the run evaluates on the
    store's own test split."""
    from types import SimpleNamespace

    from exvae_dist.data import ingest as ingest_mod
    from exvae_dist.data.readers import read_idx
    from exvae_dist.commands.evaluate import main as evaluate
    from exvae_dist.retrieval.store import ExemplarStore
    from exvae_dist.train.driver import run

    over = [f"train.run_dir={tmp_path / 'runs'}", "train.progress=false", "train.epochs=1",
            "train.max_steps_per_epoch=4",
            "ray.resident_mb=0", "index.kind=flat", "tracking.sample_grid=true",
            "data.name=store", f"data.store={tmp_path / 's'}", "data.n_train=null",
            "data.n_valid=null", "data.n_test=null"]
    cfg = config_mod.load("smoke", over, env={})
    np.save(tmp_path / "x.npy", read_idx(data_dir / "mnist" / "train-images-idx3-ubyte.gz")[:800])
    args = SimpleNamespace(labels=None, images_key=None, labels_key=None, data_root=None, seed=0)
    ingest_mod.ingest(ingest_mod.open_source(str(tmp_path / "x.npy"), args), tmp_path / "s",
                      n_valid=100, n_test=60, progress=False, latent_dim=cfg.model.z_dim)
    assert load_dataset(cfg.data, train_in_memory=False).train_x is None
    summary = run(cfg)
    assert summary["epoch"] == 1 and np.isfinite(summary["val_elbo"])
    assert ExemplarStore(tmp_path / "s").latest_complete() is not None  # versions beside it
    assert not (cfg.run_path() / "store.zarr").exists()
    assert list((cfg.run_path() / "samples").glob("*.png"))  # grid from streamed centres
    monkeypatch.setenv("EXVAE_DATA_DIR", str(data_dir))
    assert evaluate([str(cfg.run_path()), "eval.n_samples=20", "eval.n_test=10",
                     "eval.pictures=false", "eval.knn_ks=[1]",
                     "eval.name=store_test"]) == 0
    assert "log_likelihood" in (cfg.run_path() / "eval" / "store_test" /
                                "summary.json").read_text()


@pytest.mark.slow
def test_a_bit_flipped_image_chunk_stops_a_ray_run_with_a_message(tmp_path, data_dir, ray_local):
    """Before, RawRows read rows by pread without the chunk's CRC32C, so the Ray
    trainer trained on flipped pixels and finished rc 0. Now the worker's first read of the
    chunk (all images resident, the default) stops the run and names the ingest."""
    from types import SimpleNamespace

    from exvae_dist.data import ingest as ingest_mod
    from exvae_dist.data.readers import read_idx
    from exvae_dist.train.driver import run

    over = [f"train.run_dir={tmp_path / 'runs'}", "train.progress=false", "train.epochs=1",
            "train.max_steps_per_epoch=2",
            "ray.max_failures=0", "index.kind=flat", "tracking.enabled=false",
            "tracking.sample_grid=false", "data.name=store", f"data.store={tmp_path / 's'}",
            "data.n_train=null", "data.n_valid=null", "data.n_test=null"]
    cfg = config_mod.load("smoke", over, env={})
    np.save(tmp_path / "x.npy", read_idx(data_dir / "mnist" / "train-images-idx3-ubyte.gz")[:500])
    args = SimpleNamespace(labels=None, images_key=None, labels_key=None, data_root=None, seed=0)
    ingest_mod.ingest(ingest_mod.open_source(str(tmp_path / "x.npy"), args), tmp_path / "s",
                      n_valid=50, n_test=50, progress=False, latent_dim=cfg.model.z_dim)
    [chunk] = [p for p in (tmp_path / "s" / "images" / "c").rglob("*") if p.is_file()]
    data = bytearray(chunk.read_bytes())
    data[784 * 7 + 400] ^= 0x10  # one pixel of row 7
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception) as info:
        run(cfg)
    # Ray may cut the front of a worker's error snippet: its end names the chunk and the fix
    assert "chunk 0" in str(info.value) and "fails its CRC32C checksum" in str(info.value), \
        str(info.value)[-2000:]
    assert "re-run the `python -m exvae_dist.ingest` command" in str(info.value)


WORKER_RSS = r"""
import sys
from pathlib import Path
import numpy as np, torch
from exvae_dist import config as config_mod
from exvae_dist.core import loop
from exvae_dist.core.group import Group
from exvae_dist.retrieval.store import ExemplarStore
from exvae_dist.core.cache import placement
from exvae_dist.train.worker import build_parts

root = Path(sys.argv[1])
cfg = config_mod.load("smoke", [f"train.run_dir={root}", "train.progress=false",
    "tracking.enabled=false", "tracking.sample_grid=false", "prior.rat=false",
    "prior.subsample=200", "model.hidden=32", "model.z_dim=64", "train.max_steps_per_epoch=20",
    "train.epochs=1", "ray.resident_mb=0", "train.threads=1"], env={})
torch.set_num_threads(1)
valid = torch.bernoulli(torch.full((200, 784), 0.2))
store = ExemplarStore(root / "store")
# where the driver would place the cache: in the worker below index.auto_exact_below, else
# latent versions in the store, streamed (what keeps a worker's memory flat in N)
parts = build_parts(cfg, root, store, valid, True, (1, 28, 28), None, Group(),
                    where=placement(cfg.index, store.n, cfg.prior.rat))

class NoCheckpoints:
    def load(self): return None
    def save(self, *a): pass

from exvae_dist.runs.recorder import NullRecorder

parts.sink, parts.recorder = NoCheckpoints(), NullRecorder()
state, sampler, _ = loop.start(parts)   # a refresh pass over all N rows
summary = loop.run_epoch(parts, state, sampler)  # steps, refresh, streamed validation
assert np.isfinite(summary["val_elbo"])
# VmHWM: this process image's peak (ru_maxrss would carry the forking parent's across exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print("RSS_MB", int(hwm.split()[1]) / 1024)
"""


def test_worker_peak_memory_does_not_grow_with_n(tmp_path):
    """A worker's parts at N = 20,000 and 200,000 (ray.resident_mb=0): refresh pass, steps
    and validation; the images alone would differ by 141 MB, the latents by 46 MB."""
    from exvae_dist.retrieval.store import RANDOM_READ_LAYOUT, ExemplarStore

    # glibc's dynamic mmap threshold lets freed 6 MB batch buffers pile up in the heap (RSS
    # then tracks how many batches ran, not what is live): a fixed threshold returns them
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072"}
    peaks = {}
    for n in (20_000, 200_000):
        images = np.random.default_rng(0).integers(0, 2, (n, 1, 28, 28), dtype=np.uint8) * 255
        ExemplarStore.create(tmp_path / str(n) / "store", images, 64, chunk_rows=8192,
                             image_layout=RANDOM_READ_LAYOUT)
        del images
        # the worker's process sees only the store
        out = subprocess.run([sys.executable, "-c", WORKER_RSS, str(tmp_path / str(n))],
                             capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        peaks[n] = float(out.stdout.split("RSS_MB")[-1])
    assert peaks[200_000] < peaks[20_000] + 50, peaks


def test_mid_epoch_refreshes_on_encoder_actors(tmp_path, data_dir, ray_local):
    """index.refresh_workers=1: mid-epoch versions are encoded by an actor while the worker
    keeps stepping (steps search the older version meanwhile), completed between steps, and
    served; the epoch-end refresh still runs on the worker."""
    from exvae_dist.retrieval.store import ExemplarStore
    from exvae_dist.train.driver import run, store_path

    # 100 small steps, the first refresh at step 10: the window an actor's version has to
    # land in (10 steps of 100, refreshes from step 3, ended before it did on a busy CI box)
    cfg = smoke(data_dir, tmp_path, "data.n_train=1000", "data.n_valid=100", "train.epochs=1",
                "train.batch_size=10", "train.log_every=1", "index.kind=flat",
                "prior.refresh_every=10", "index.refresh_workers=1", "tracking.enabled=false",
                "tracking.sample_grid=false")
    summary = run(cfg)
    recs = [r for r in records(cfg.run_path()) if "loss" in r and "step" in r]
    seen = [r["index_version"] for r in recs]
    assert seen == sorted(seen) and seen[0] == 1
    assert max(seen) > 1, seen  # an actor-encoded version was served mid-epoch
    store = ExemplarStore(store_path(cfg))
    assert summary["index_version"] == store.latest_complete() >= 3
    for v in store.complete_versions():
        assert np.isfinite(store.read_latents(v)).all()


def test_refresh_encoders_that_cannot_start_fail_the_run_start(tmp_path, data_dir, ray_local):
    """index.refresh_workers: the encoder actors are started (store opened, model built)
    before the first step, so one that cannot start fails there, naming its cause, and not
    at the first mid-epoch refresh."""
    from exvae_dist.train.refresh_actors import start_refresh_encoders

    cfg = smoke(data_dir, tmp_path)
    with pytest.raises(Exception, match="no_store_here"):
        start_refresh_encoders(str(tmp_path / "no_store_here.zarr"), config_mod.to_dict(cfg),
                               (1, 28, 28), workers=1, cpus=0.5)
