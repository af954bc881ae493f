"""Injected faults and what they must give: a corrupt latent version skipped for the newest good
one, a truncated checkpoint resumed past, a full disk named as such with the checkpoint kept,
a second start in a run folder refused, inputs that cannot work refused before Ray starts."""

import errno
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from exvae_dist.runs import checkpoint as ckpt
from exvae_dist import config as config_mod
from exvae_dist.runs.checkpoint import (CheckpointWriteError, first_readable, load_checkpoint,
                                        ray_resume_candidates, save_checkpoint,
                                        sweep_run_folder)
from exvae_dist.runs.preflight import PreflightError
from exvae_dist.retrieval.store import ExemplarStore
from exvae_dist.runs.run_lock import RunLock, RunLocked

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def smoke_cfg(data_dir):
    def make(tmp_path, *extra):
        return config_mod.load("smoke", [f"train.run_dir={tmp_path}", "train.progress=false",
                                         "data.n_train=200", "data.n_valid=50",
                                         "tracking.enabled=false", "tracking.sample_grid=false",
                                         "train.threads=1", *extra],
                               env={"EXVAE_DATA_DIR": str(data_dir)})
    return make


def timed(fn, *args):
    """(exception raised by fn(*args), seconds it took): the refusal times of the report."""
    start = time.perf_counter()
    with pytest.raises(Exception) as info:
        fn(*args)
    seconds = time.perf_counter() - start
    print(f"refused in {seconds:.2f} s: {info.value}")
    return info.value, seconds


# ------------------------------------------------------------------ a corrupt latent version

def test_service_and_resume_skip_a_corrupt_newest_version(tmp_path):
    """The service builds the newest GOOD version; the refresh does not reuse the corrupt one
    from the checkpoint but publishes above it (no hang: nothing waits for a build that fails)."""
    from exvae_dist.config import IndexConfig
    from exvae_dist.retrieval.service import IndexHolder
    from exvae_dist.retrieval.store import StoreError
    from exvae_dist.core.group import Group
    from exvae_dist.train.refresh import LatentRefresh

    n, d = 300, 4
    store = ExemplarStore.create(tmp_path / "s.zarr", np.zeros((n, 2, 2), np.uint8), d,
                                 chunk_rows=64)
    rng = np.random.default_rng(0)
    for v in (1, 2):
        store.begin_version(v)
        store.write_rows(v, 0, rng.normal(size=(n, d)).astype(np.float32))
        store.mark_complete(v)
    chunk = sorted(p for p in (store.path / "latents" / "v000002" / "c").rglob("*")
                   if p.is_file())[1]
    chunk.write_bytes(bytes(chunk.stat().st_size))  # same size, zeros: only a checksum sees it

    holder = IndexHolder(str(store.path), IndexConfig(kind="flat"), load_latest=True)
    try:
        assert holder.wait_for_version(1, timeout=30) == 1
        with pytest.raises(StoreError, match="not complete"):
            holder.refresh(2)
    finally:
        holder.close()

    refresh = LatentRefresh(ExemplarStore(store.path), torch.zeros(n, 4), Group())
    assert refresh.start(resume_version=2, resume_step=10) is None  # publish a fresh one
    assert refresh._next == 3


# ------------------------------------------------------------------------------- checkpoints

def test_truncated_newest_checkpoint_resumes_from_the_previous_one(tmp_path, smoke_cfg, caplog):
    from exvae_dist.train.local import fit

    cfg = smoke_cfg(tmp_path, "train.epochs=2")
    fit(cfg)
    run = cfg.run_path()
    assert load_checkpoint(run / ckpt.PREVIOUS)["epoch"] == 1  # two checkpoints kept
    data = (run / ckpt.LATEST).read_bytes()
    (run / ckpt.LATEST).write_bytes(data[:len(data) // 3])  # a torn write of epoch 2

    with caplog.at_level(logging.WARNING):
        again = fit(smoke_cfg(tmp_path, "train.epochs=3"))
    assert "resuming from the previous good checkpoint" in caplog.text
    assert again["epoch"] == 3 and again["step"] == 6  # epochs 2 and 3 trained from epoch 1
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text()
              .splitlines() if "val_elbo" in line]
    assert epochs == [1, 2, 3]  # the lost epoch 2's records were rewound, then redone


def scribble(path: Path, seek: int = 200, size: int = 4096, seed: int = 0) -> None:
    """Random bytes written into a file in place, like `dd if=/dev/urandom of=path bs=1
    seek=200 count=4096 conv=notrunc`."""
    with open(path, "r+b") as f:
        f.seek(seek)
        f.write(np.random.default_rng(seed).bytes(size))


def test_random_bytes_in_a_checkpoint_fail_its_digest(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"w": torch.randn(1000, 100), "epoch": 1})
    assert load_checkpoint(path)["epoch"] == 1
    for seek in (200, 100_000):  # the pickle, then a tensor's bytes (torch.load takes them)
        save_checkpoint(path, {"w": torch.randn(1000, 100), "epoch": 1})
        scribble(path, seek=seek)
        with pytest.raises(ckpt.UnreadableCheckpoint, match="unreadable"):
            load_checkpoint(path)


def test_random_bytes_in_checkpoints_fall_back_to_the_newest_good_one(tmp_path, smoke_cfg,
                                                                      caplog):
    """Checkpoint.pt truncated, random bytes in checkpoint.prev.pt; best.pt
    (written after prev) is the newest readable one, and the run finishes from it."""
    from exvae_dist.train.local import fit

    cfg = smoke_cfg(tmp_path, "train.epochs=2")
    fit(cfg)
    run = cfg.run_path()
    assert ckpt.resume_candidates(run)[0].name == ckpt.LATEST
    data = (run / ckpt.LATEST).read_bytes()
    (run / ckpt.LATEST).write_bytes(data[:len(data) // 3])
    scribble(run / ckpt.PREVIOUS, seek=2000)  # data.pkl is small: this lands in the weights
    for name, age in ((ckpt.PREVIOUS, 100), (ckpt.BEST, 50)):  # prev older than best
        os.utime(run / name, (time.time() - age,) * 2)
    assert [p.name for p in ckpt.resume_candidates(run)] == [ckpt.LATEST, ckpt.BEST,
                                                             ckpt.PREVIOUS]
    with caplog.at_level(logging.WARNING):
        again = fit(smoke_cfg(tmp_path, "train.epochs=3"))
    assert f"resuming from the previous good checkpoint {run / ckpt.BEST}" in caplog.text
    assert again["epoch"] == 3 and again["step"] == 6


def test_first_readable_never_returns_start_over_while_checkpoints_exist(tmp_path):
    good = {"epoch": 1}
    save_checkpoint(tmp_path / "old.pt", good)
    (tmp_path / "new.pt").write_bytes(b"torn")
    value, path = first_readable([tmp_path / "new.pt", tmp_path / "old.pt"], load_checkpoint)
    assert value == good and path.name == "old.pt"
    assert first_readable([], load_checkpoint) is None  # a fresh run
    with pytest.raises(RuntimeError, match="every checkpoint is unreadable, refusing to start"):
        first_readable([tmp_path / "new.pt"], load_checkpoint)


def test_ray_resume_falls_back_to_older_folders_then_the_run_folder(tmp_path):
    new, old = tmp_path / "checkpoint_2026-01-02_00-00-00.000000", tmp_path / "checkpoint_2026-01-01_00-00-00.000000"
    for folder in (new, old):
        folder.mkdir()
    save_checkpoint(tmp_path / ckpt.LATEST, {"epoch": 1})
    assert ray_resume_candidates(new, tmp_path) == [new, old, tmp_path]
    assert ray_resume_candidates(None, tmp_path) == [new, old, tmp_path]
    # Ctrl-C before Ray registered the last report: the run folder's checkpoint is newer
    save_checkpoint(new / ckpt.LATEST, {"epoch": 1, "step": 4})
    save_checkpoint(tmp_path / ckpt.LATEST, {"epoch": 1, "step": 5, "within_epoch": {}})
    assert ray_resume_candidates(new, tmp_path) == [tmp_path, new, old]
    assert ckpt.resume_point(tmp_path) == (2, 5)  # epoch 2 (counted from 1), step 5


def test_full_disk_is_named_with_path_and_free_space_and_keeps_the_checkpoint(
        tmp_path, smoke_cfg, monkeypatch):
    from exvae_dist.train.local import fit

    real_save = torch.save

    def save(state, f, *a, **kw):  # the disk fills up during epoch 2's checkpoint
        if isinstance(state, dict) and state.get("epoch") == 2:
            with open(f, "wb") as out:
                out.write(b"half a checkp")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", save)
    cfg = smoke_cfg(tmp_path, "train.epochs=2")
    with pytest.raises(CheckpointWriteError, match=r"no space left on device writing checkpoint "
                       r".*(best|checkpoint)\.pt \(\d+\.\d MiB free on .*\).* intact") as info:
        fit(cfg)
    assert info.value.errno == errno.ENOSPC
    run = cfg.run_path()
    assert load_checkpoint(run / ckpt.LATEST)["epoch"] == 1  # the last good one, intact
    assert not list(run.glob("*.tmp"))


def test_torch_iostream_error_on_a_full_disk_is_called_no_space(tmp_path, monkeypatch):
    def save(state, f, *a, **kw):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(ckpt.torch, "save", save)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: type("U", (), {"free": 4096})())
    with pytest.raises(CheckpointWriteError, match=r"no space left .*0\.0 MiB free"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})


def test_sweep_removes_temp_files_and_unregistered_ray_folders_only(tmp_path):
    (tmp_path / "best.pt.abc123.tmp").write_bytes(b"x" * 100)
    registered, orphan = tmp_path / "checkpoint_2026-01-01", tmp_path / "checkpoint_2026-01-02"
    registered.mkdir(), orphan.mkdir()
    save_checkpoint(tmp_path / ckpt.LATEST, {"epoch": 1})
    assert sweep_run_folder(tmp_path) == [tmp_path / "best.pt.abc123.tmp"]  # no snapshot: keep
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": registered.name,
                                        "path": str(registered)}]}
    (tmp_path / ckpt.RAY_SNAPSHOT).write_text(json.dumps(snapshot))
    assert sweep_run_folder(tmp_path) == [orphan]
    assert registered.is_dir() and (tmp_path / ckpt.LATEST).is_file()


# ------------------------------------------------------------------------- one run per folder

HOLD = """
import sys, time
from exvae_dist.runs.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_start_in_the_same_run_folder_is_refused(tmp_path, smoke_cfg):
    from exvae_dist.train.driver import run
    from exvae_dist.train.local import fit

    cfg = smoke_cfg(tmp_path, "train.epochs=1")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cfg.run_path())],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        for start in (fit, run):
            err, seconds = timed(start, cfg)
            assert isinstance(err, RunLocked)
            assert f"pid {holder.pid}" in str(err) and "in use by another run" in str(err)
    finally:
        holder.kill()
        holder.wait()
    # the holder was SIGKILLed: its lock is stale now and the next start takes it over
    with RunLock(cfg.run_path()) as lock:
        assert json.loads(lock.path.read_text())["pid"] != holder.pid
    assert not (cfg.run_path() / "run.lock").exists()  # released at exit


def test_lock_of_another_host_is_refused_with_how_to_clear_it(tmp_path):
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere",
                                                   "started": 0}))
    with pytest.raises(RunLocked, match=r"pid 1 on elsewhere.*delete .*run\.lock"):
        RunLock(tmp_path).acquire()


# ------------------------------------------------------------- inputs that cannot work, early

@pytest.mark.parametrize("override,cause", [
    ("data.n_train=1", r"data\.n_train=1: .*leave-one-out"),
    ("prior.subsample=1", r"prior\.subsample=1: .*M=1"),
])
def test_too_few_exemplars_are_refused_before_training(tmp_path, smoke_cfg, override, cause):
    from exvae_dist.train.driver import run
    from exvae_dist.train.local import fit

    cfg = smoke_cfg(tmp_path, override)
    for start in (fit, run):
        err, seconds = timed(start, cfg)
        assert isinstance(err, PreflightError) and re.search(cause, str(err))
    assert not cfg.run_path().exists()  # refused before anything is written or Ray starts


def test_a_store_with_too_few_images_is_refused_before_training(tmp_path, smoke_cfg):
    """A store's N is known only from the store: 3 images leave the default M = N // 2 = 1,
    whose leave-one-out mixture is empty (the loss would be inf)."""
    from types import SimpleNamespace

    from exvae_dist.data.ingest import ingest, open_source
    from exvae_dist.train.local import fit

    np.save(tmp_path / "tiny.npy", np.random.default_rng(0).integers(0, 256, (5, 28, 28),
                                                                      dtype=np.uint8))
    args = SimpleNamespace(labels=None, images_key=None, labels_key=None, data_root=None, seed=0)
    ingest(open_source(str(tmp_path / "tiny.npy"), args), tmp_path / "tiny.zarr", n_valid=1,
           n_test=1, progress=False)
    cfg = smoke_cfg(tmp_path, "data.name=store", f"data.store={tmp_path / 'tiny.zarr'}",
                    "data.n_train=null")
    err, seconds = timed(fit, cfg)
    assert isinstance(err, PreflightError)
    assert re.search(r"N // 2 = 1, as data\.store=.*holds 3 training images", str(err)), str(err)
    assert not cfg.run_path().exists()


def test_more_workers_than_the_local_cluster_has_is_refused(tmp_path, smoke_cfg, ray_local):
    from exvae_dist.train.driver import run

    cfg = smoke_cfg(tmp_path, "ray.num_workers=3")  # ray_local has 2 CPUs, no autoscaler
    err, seconds = timed(run, cfg)
    assert isinstance(err, PreflightError)
    assert "ray.num_workers=3" in str(err) and "need 3 CPUs" in str(err) and "has 2" in str(err)
    assert not (cfg.run_path() / "run.lock").exists()


@pytest.mark.parametrize("fault", ["wrong_root", "truncated_gz", "missing_store"])
def test_a_bad_data_path_is_refused_before_anything_starts(tmp_path, smoke_cfg, data_dir, fault):
    """Before, the message came after Ray had started (~13 s), after a traceback,
    and left an empty data folder and a run folder behind."""
    import shutil

    from exvae_dist.train.driver import run

    extra = {"wrong_root": [f"data.root={tmp_path / 'nowhere'}", "data.download=false"],
             "missing_store": ["data.name=store", f"data.store={tmp_path / 'no.zarr'}",
                               "data.n_train=null"]}.get(fault, [])
    if fault == "truncated_gz":
        shutil.copytree(data_dir / "mnist", tmp_path / "data" / "mnist")
        gz = tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz"
        gz.write_bytes(gz.read_bytes()[:100_000])
        extra = [f"data.root={tmp_path / 'data'}"]
    cfg = smoke_cfg(tmp_path, *extra)
    err, seconds = timed(run, cfg)
    assert isinstance(err, PreflightError), repr(err)
    assert re.search({"wrong_root": "not found in .*nowhere.*set data.root",
                      "truncated_gz": "checksum mismatch .*train-images-idx3-ubyte.gz",
                      "missing_store": r"data.store=.*no.zarr does not exist: ingest"}[fault], str(err)), str(err)
    assert not cfg.run_path().exists() and not (tmp_path / "nowhere").exists()


def test_the_train_command_refuses_a_wrong_data_path_in_one_line(tmp_path):
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "exvae_dist.train", "--config", "smoke",
                          f"data.root={tmp_path / 'nowhere'}", "data.download=false",
                          f"train.run_dir={tmp_path}",
                          "tracking.enabled=false"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    print(f"refused in {time.perf_counter() - start:.1f} s: {out.stderr}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "train-images-idx3-ubyte.gz not found in" in out.stderr
    assert "Ray" not in out.stderr  # refused before Ray started
    assert list(tmp_path.iterdir()) == []  # no run folder, no data folder


def test_a_failed_download_leaves_no_empty_data_folder(tmp_path):
    from exvae_dist.data import sources
    from exvae_dist.data.download import DataFileMissingError, download_file

    def offline(url, dest):
        raise OSError("network is unreachable")

    with pytest.raises(DataFileMissingError):
        download_file(sources.MNIST["train_images"], tmp_path / "root" / "mnist", fetch=offline)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override,cause", [
    ("prior.k=100000", r"prior\.k=100000: .*cannot exceed 99"),
    ("index.shards=64", r"index\.shards=64: .*this machine has \d+ CPUs"),
])
def test_impossible_retrieval_settings_are_refused_before_training(tmp_path, smoke_cfg,
                                                                   override, cause):
    from exvae_dist.train.driver import run

    cfg = smoke_cfg(tmp_path, override)
    err, seconds = timed(run, cfg)
    assert isinstance(err, PreflightError) and re.search(cause, str(err)), str(err)
    assert not cfg.run_path().exists()


def test_a_warmup_longer_than_the_run_is_warned_about_with_the_final_beta(smoke_cfg, tmp_path,
                                                                         caplog):
    from exvae_dist.runs.preflight import check_config

    with caplog.at_level(logging.WARNING):
        check_config(smoke_cfg(tmp_path, "train.epochs=3", "train.warmup_epochs=100"))
    assert "train.warmup_epochs=100 exceeds train.epochs=3" in caplog.text
    assert "reaches 0.03 in the last epoch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_config(smoke_cfg(tmp_path, "train.epochs=3", "train.warmup_epochs=3"))
    assert "warmup" not in caplog.text
