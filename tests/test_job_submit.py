"""`ray job submit --working-dir . -- python -m exvae_dist.train` as typed: a run whose default
./runs would lie in the job's temporary copy of the working dir goes to a persistent folder
($RAY_STORAGE, else ~/exvae_runs), said at the start; a train.run_dir the user set there stays
refused with its message."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from own_ray import head_ports, stop_own_ray, wait_for_agent

from exvae_dist import config as config_mod
from exvae_dist.runs import run_folder

REPO = Path(__file__).resolve().parent.parent
SHORT = ("train.epochs=1", "train.max_steps_per_epoch=2", "data.n_train=300", "data.n_valid=100",
         "data.n_test=20", "train.progress=false", "tracking.enabled=false", "train.threads=1",
         "ray.num_workers=1")


def job_dir(tmp_path: Path) -> Path:
    """A folder laid out as Ray unpacks a job's --working-dir."""
    path = (tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files"
            / "_ray_pkg_0123abcd")
    path.mkdir(parents=True)
    return path


def test_default_run_dir_in_a_job_dir_moves_to_a_persistent_folder(tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.chdir(job_dir(tmp_path))
    env = {"RAY_TMPDIR": str(tmp_path / "ray")}
    cfg = config_mod.load("smoke", [])
    assert not run_folder.run_dir_given("smoke", [])
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    moved = run_folder.outside_job_dir(cfg, False, env)
    assert moved.run_path() == home / "exvae_runs" / "smoke"
    assert f"run folder: {home / 'exvae_runs' / 'smoke'}" in capsys.readouterr().out
    assert run_folder.temporary_working_dir(moved.run_path()) is None
    # the cluster's storage path wins where set
    storage = tmp_path / "storage"
    moved = run_folder.outside_job_dir(cfg, False, {**env, "RAY_STORAGE": str(storage)})
    assert moved.run_path() == storage / "smoke"
    # outside a job nothing changes
    monkeypatch.chdir(tmp_path)
    assert run_folder.outside_job_dir(cfg, False, env) is cfg


def test_a_run_dir_the_user_set_inside_the_job_dir_stays_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(job_dir(tmp_path))
    env = {"RAY_TMPDIR": str(tmp_path / "ray")}
    overrides = ["train.run_dir=runs"]
    assert run_folder.run_dir_given("smoke", overrides)
    cfg = config_mod.load("smoke", overrides)
    kept = run_folder.outside_job_dir(cfg, True, env)
    assert kept is cfg
    with pytest.raises(run_folder.RunFolderError,
                       match="lies inside the working dir Ray unpacked for this job"):
        run_folder.prepare(kept)
    # a --config file that sets train.run_dir counts as set
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("train:\n  run_dir: runs\n")
    assert run_folder.run_dir_given(str(yaml), [])


def test_fit_in_a_job_dir_puts_the_run_and_the_array_store_outside_it(tmp_path, monkeypatch,
                                                                       data_dir):
    import numpy as np

    import exvae_dist
    from exvae_dist.data import load_dataset

    cfg = config_mod.load("smoke", ["data.n_train=300"], env={"EXVAE_DATA_DIR": str(data_dir)})
    images = np.rint(load_dataset(cfg.data).train_x * 255).astype(np.uint8).reshape(-1, 28, 28)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray"))
    monkeypatch.setenv("EXVAE_DATA_DIR", str(data_dir))
    monkeypatch.delenv("RAY_STORAGE", raising=False)
    inside = job_dir(tmp_path)
    monkeypatch.chdir(inside)
    model = exvae_dist.fit(images, config="smoke", valid=50, test=50,
                           train={"epochs": 1, "max_steps_per_epoch": 2, "progress": False,
                                  "threads": 1}, **{"tracking.enabled": False})
    assert model.trained.path == home / "exvae_runs" / "smoke"
    assert len(list((home / "exvae_runs" / "stores").iterdir())) == 1  # the array's store
    assert list(inside.iterdir()) == []  # nothing written into the job's folder


@pytest.mark.slow
def test_ray_job_submit_as_typed_runs_outside_the_job_dir(tmp_path, data_dir):
    """The README's job block in its short form: bare `python` (the venv's, first on PATH),
    no train.run_dir; the run lands in ~/exvae_runs (HOME is a temporary folder here)."""
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rjs", dir="/tmp"))  # short: Ray's socket paths
    bin_dir = Path(sys.executable).parent
    ports = head_ports()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PYTHONPATH", "RAY_STORAGE", "PYTEST_CURRENT_TEST")}
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    ray = str(bin_dir / "ray")
    try:
        subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--num-cpus",
                        "2", "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
                        "--port", str(ports["gcs"]), "--dashboard-port", str(ports["dashboard"]),
                        "--dashboard-agent-listen-port", str(ports["agent"]),
                        "--ray-client-server-port", str(ports["client"]),
                        f"--temp-dir={ray_tmp}"],
                       env=env, check=True, capture_output=True, timeout=120)
        wait_for_agent(ports["agent"])
        runtime = '{"env_vars": {"EXVAE_DATA_DIR": "%s"}}' % data_dir
        done = subprocess.run(
            [ray, "job", "submit", "--address", f"http://127.0.0.1:{ports['dashboard']}",
             "--working-dir", ".", "--runtime-env-json", runtime, "--",
             "python", "-m", "exvae_dist.train", "--config", "smoke", *SHORT],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_own_ray(ray_tmp)  # not `ray stop`: it stops every Ray on the machine
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-3000:]
    run = home / "exvae_runs" / "smoke"
    assert f"run folder: {run}" in out
    assert (run / "summary.json").is_file()
