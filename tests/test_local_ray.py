"""The local mode (`python -m exvae_dist.train` with no Ray address) beside other Rays on the
same machine."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from own_ray import head_ports, stop_own_ray

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_ray_start_during_a_local_run_leaves_the_run_alone(tmp_path, data_dir):
    """Ray Train's PlacementGroupCleaner asks the state API whether the run's controller is
    alive. Unpointed, it asked the cluster that a `ray start` during the run had just made,
    found no such controller there and removed the run's placement group: the run died a
    few seconds after the `ray start`. Both Rays share RAY_TMPDIR here, as two Rays of one
    user share /tmp/ray."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rlo", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "PYTEST_CURRENT_TEST")}
    env.update(RAY_TMPDIR=str(ray_tmp), EXVAE_DATA_DIR=str(data_dir))
    run_dir = tmp_path / "runs"
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        train = subprocess.Popen(
            [sys.executable, "-m", "exvae_dist.train", "--config", "smoke",
             f"train.run_dir={run_dir}", "train.epochs=1000", "data.n_train=300",
             "data.n_valid=100", "data.n_test=20", "train.progress=false",
             "tracking.enabled=false", "train.threads=1", "ray.num_workers=1"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        metrics = run_dir / "smoke" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert train.poll() is None, "the run ended before training:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no step in 240 s:\n" + log.read_text()[-3000:]
            time.sleep(1)
        ports = head_ports()
        subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address",
             "127.0.0.1", "--num-cpus", "1", "--dashboard-host", "127.0.0.1",
             "--disable-usage-stats", "--port", str(ports["gcs"]),
             "--dashboard-port", str(ports["dashboard"]),
             "--dashboard-agent-listen-port", str(ports["agent"]),
             "--ray-client-server-port", str(ports["client"])],
            env=env, check=True, capture_output=True, timeout=120)
        assert (ray_tmp / "ray" / "ray_current_cluster").is_file()  # what the cleaner reads
        time.sleep(10)  # the cleaner checks every second
        assert train.poll() is None, "the run died after the ray start:\n" + log.read_text()[-3000:]
    finally:
        train.terminate()
        try:
            train.wait(timeout=60)
        except subprocess.TimeoutExpired:
            train.kill()
        stop_own_ray(ray_tmp)  # both Rays; not `ray stop`, which stops every Ray here
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "Cleaning up placement group" not in log.read_text()


def test_every_local_ray_starts_without_preemption_watcher_and_with_its_own_state_api(
        monkeypatch):
    """What the processes ray.init starts inherit (Ray reads both variables there): Ray Train's
    preemption watcher off (a local Ray has no spot nodes, and the watcher is one more process
    waking every 10 ms beside the worker), and the state API the caller names, which this
    process does not keep afterwards."""
    import ray

    from exvae_dist.train import driver

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs=kwargs, env={k: os.environ.get(k) for k in (
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_API_SERVER_ADDRESS")})
        return "context"

    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", fake_init)
    assert driver.start_local_ray_without_dashboard(3, log_to_driver=False) == "context"
    assert seen["env"] == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                           "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}
    assert seen["kwargs"] == {"_node_ip_address": "127.0.0.1", "address": "local",
                              "num_cpus": 3, "include_dashboard": False, "log_to_driver": False}
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
    # a user who wants the watcher keeps it
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    driver.start_local_ray("http://127.0.0.1:2")
    assert seen["env"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
