"""The Ray trainer: its step is the one-process step, it trains on 2 workers with a refreshing
index, survives an index crash, resumes, and runs as a `ray job submit` job."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from exvae_dist import config as config_mod
from exvae_dist.data import load_dataset
from exvae_dist.objective import build_model
from exvae_dist.step import PriorSampler, TorchExactSearch, exemplar_centres, train_step
from exvae_dist.trainer import batch_images, epoch_batches, make_optimizer
from exvae_dist.train.collectives import Group
from exvae_dist.train.exemplars import StoredImages, ensure_store
from exvae_dist.train.refresh import LatentRefresh
from exvae_dist.train.service_client import ServiceSearch
from exvae_dist.train.worker import Worker

REPO = Path(__file__).resolve().parent.parent


def smoke(data_dir, tmp_path, *extra):
    return config_mod.load("smoke", [f"train.run_dir={tmp_path}", "train.progress=false",
                                     "ray.controller_failure_limit=0", *extra],
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


# ---------------------------------------------------------------- (a) the step is the same step

def test_one_worker_ddp_step_equals_one_process_step(tmp_path, data_dir, ray_local):
    import torch.distributed as dist

    from exvae_dist.retrieval.service import start_index_service, wait_for_version

    cfg = smoke(data_dir, tmp_path, "data.n_train=1000", "data.n_valid=100", "index.kind=flat")
    splits = load_dataset(cfg.data)
    train_x = torch.from_numpy(splits.train_x)
    seed = cfg.train.seed

    # the one-process trainer's pieces, set up as trainer.fit sets them up
    torch.manual_seed(seed)
    model_a = build_model(cfg, splits.image_shape)
    opt_a = make_optimizer(model_a, cfg)
    search_a = TorchExactSearch()
    sampler_a = PriorSampler(cfg.prior, train_x, search_a, seed=seed + 1)
    binarize_a = torch.Generator().manual_seed(seed + 2)
    search_a.update(exemplar_centres(model_a, train_x))

    # the Ray worker's pieces: DDP in a 1-rank gloo group, the index service over the store
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    handle = None
    try:
        group = Group.current()
        store = ensure_store(tmp_path / "store.zarr", splits.train_x, splits.image_shape,
                             model_a.net.top_dim)
        handle = start_index_service(str(store.path), cfg.index)
        search_b = ServiceSearch(handle)
        images = StoredImages.from_store(store)
        worker = Worker(cfg, images, splits.dynamic, splits.image_shape, search_b, group)
        assert worker.ddp is not worker.model  # really wrapped in DDP
        refresh = LatentRefresh(store, images, group, search_b)
        assert refresh.start() is None
        version = refresh.publish(worker.model.net, step=0)
        wait_for_version(handle, version, timeout=60)
        # the refresh pass wrote exactly the one-process cache
        assert torch.equal(refresh.centres(), search_a.latents)

        ids = epoch_batches(len(train_x), cfg.train.batch_size, np.random.default_rng(seed))[0]
        rng_state = torch.get_rng_state()
        x = batch_images(train_x, ids, splits.dynamic, binarize_a)
        m_a = train_step(model_a, opt_a, x, sampler_a(model_a, ids, x), beta=0.5)
        torch.set_rng_state(rng_state)
        m_b = worker.step(ids, beta=0.5)
    finally:
        dist.destroy_process_group()
        if handle is not None:
            ray_local.kill(handle)

    assert m_b["index_version"] == version
    assert m_b["candidates"] == m_a["candidates"] > 0
    assert m_b["loss"] == pytest.approx(m_a["loss"], rel=1e-6)
    grads_a = [p.grad for p in model_a.parameters()]
    grads_b = [p.grad for p in worker.model.parameters()]
    assert sum(g.abs().sum().item() for g in grads_a) > 0
    for g_a, g_b in zip(grads_a, grads_b):
        torch.testing.assert_close(g_b, g_a, rtol=1e-5, atol=1e-6)
    for p_a, p_b in zip(model_a.parameters(), worker.model.parameters()):
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


# ------------------------------------------- a worker dies mid-epoch: restart from the checkpoint

class WorkerKiller(threading.Thread):
    """SIGKILLs one Ray Train worker process once metrics.jsonl shows a step of `epoch`."""

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
                workers = [p for p in psutil.process_iter(["cmdline"])
                           if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
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


# --------------------------------------------------- (d) `ray job submit` to a loopback head

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_against_a_local_head(tmp_path, data_dir):
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    # a short temp dir: Ray's socket paths must stay under ~107 characters
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--port", str(free_port()), "--num-cpus", "2",
         "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp,
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # its own process group: stopped below by id, nothing else
    try:
        # hidden folders (.venv, .git, local caches) are not needed by the job, and Ray refuses
        # uploads over 100 MB; Ray honours .gitignore but not .git/info/exclude
        runtime_env = {"env_vars": {"EXVAE_DATA_DIR": str(data_dir), "RAY_AUTH_MODE": "disabled"},
                       "excludes": [".*", "runs", "bench/out", "mlruns", "*.zarr",
                                    "*.db"]}
        cmd = [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dash}",
               "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
               sys.executable, "-m", "exvae_dist.train", "--config", "smoke",
               f"train.run_dir={tmp_path}", "train.epochs=1", "data.n_train=1000",
               "data.n_valid=200", "train.progress=false", "ray.controller_failure_limit=0"]
        deadline = time.monotonic() + 60
        while True:  # the job server answers a few seconds after `ray start`
            out = subprocess.run([ray_cli, "job", "list", "--address",
                                  f"http://127.0.0.1:{dash}"], env=env, capture_output=True,
                                 text=True)
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240,
                             cwd=tmp_path)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
        assert summary["epoch"] == 1 and summary["step"] == 10
    finally:
        # a graceful `ray start --block` shutdown takes ~30 s here; after 5 s kill the
        # group (the head's workers then exit on their own when their raylet is gone)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


# ------------------------------------------------------------------------ small, no Ray

def test_store_of_another_training_set_is_refused(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (300, 784)).astype(np.float32) / 255
    store = ensure_store(tmp_path / "s.zarr", x, (1, 28, 28), latent_dim=8)
    assert store.chunk_rows * 4 <= store.n  # several chunks, so several writers
    assert torch.equal(StoredImages.from_store(store)[np.arange(300)], torch.from_numpy(x))
    ensure_store(tmp_path / "s.zarr", x, (1, 28, 28), latent_dim=8)  # the same set: reopened
    with pytest.raises(ValueError, match="does not belong to this run"):
        ensure_store(tmp_path / "s.zarr", x[:200], (1, 28, 28), latent_dim=8)
    with pytest.raises(ValueError, match="latent size"):
        ensure_store(tmp_path / "s.zarr", x, (1, 28, 28), latent_dim=4)
    with pytest.raises(ValueError, match="images differ"):
        ensure_store(tmp_path / "s.zarr", 1 - x, (1, 28, 28), latent_dim=8)


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
                "prior.n_pseudo=20")
    splits = load_dataset(cfg.data)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        images = StoredImages(np.rint(splits.train_x * 255).astype(np.uint8))
        worker = Worker(cfg, images, splits.dynamic, splits.image_shape, None, Group.current())
        losses = [worker.step(np.arange(i * 100, (i + 1) * 100), beta=1.0)["loss"]
                  for i in range(2)]
    finally:
        dist.destroy_process_group()
    assert all(np.isfinite(losses))
