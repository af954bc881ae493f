"""Ctrl-C: the trainer exits 130, its MLflow run is KILLED, and the rerun resumes it with every
step logged once (metrics.jsonl and MLflow alike); the same on Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _train(tmp_path, data_dir, epochs, module="exvae_dist.trainer", *extra):
    env = {**os.environ, "EXVAE_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", module, "--config", "smoke",
         f"train.run_dir={tmp_path}", f"train.epochs={epochs}", "data.n_train=300",
         "data.n_valid=100", "train.log_every=1", "train.progress=false",
         "tracking.sample_grid=false", *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(path):
    return path.read_text().splitlines() if path.is_file() else []


@pytest.mark.slow
def test_ctrl_c_exits_130_marks_killed_and_the_rerun_logs_each_step_once(tmp_path, data_dir):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "smoke"
    proc = _train(tmp_path, data_dir, epochs=50)
    deadline = time.monotonic() + 240
    # interrupt in the middle of epoch 2 (after the first checkpoint)
    while time.monotonic() < deadline and proc.poll() is None:
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
        if sum('"val_elbo"' in line for line in lines) >= 1 and len(lines) >= 6:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "rerun the same command to resume" in err
    info = json.loads((run / "mlflow_run.json").read_text())
    client = MlflowClient(info["uri"])
    assert client.get_run(info["run_id"]).info.status == "KILLED"

    again = _train(tmp_path, data_dir, epochs=3)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert client.get_run(info["run_id"]).info.status == "FINISHED"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"val_elbo"' not in line]
    assert steps == list(range(1, 10))  # 3 epochs of 3 steps, each once
    history = sorted(m.step for m in client.get_metric_history(info["run_id"], "loss"))
    assert history == list(range(1, 10))


@pytest.mark.slow
def test_ray_ctrl_c_exits_130_marks_killed_says_where_and_mlflow_equals_metrics(tmp_path,
                                                                               data_dir):
    """The default job: Ctrl-C to the Ray driver mid-epoch (mid-epoch checkpoints every 3
    steps at the refreshes every 2) exits 130 with the step it resumes from, the MLflow run
    is KILLED with an end time; the rerun says where it resumes (and not Ray's advice to
    pick a new RunConfig name), and MLflow then holds each step once, as metrics.jsonl."""
    from mlflow.tracking import MlflowClient

    run = tmp_path / "smoke"
    ray_args = ("data.n_train=600", "index.kind=flat", "prior.refresh_every=2",
                "train.checkpoint_every_steps=3")
    proc = _train(tmp_path, data_dir, 50, "exvae_dist.train", *ray_args)
    deadline = time.monotonic() + 240
    # 6 steps an epoch, checkpoints at steps 4, 6, 10, 12, 16, ...: interrupt in epoch 2,
    # past its mid-epoch checkpoint at step 10 (the workers go on while they are stopped)
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [json.loads(x)["step"] for x in _lines(run / "metrics.jsonl")
                 if '"val_elbo"' not in x]
        if steps and steps[-1] >= 11:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    said = [x for x in err.splitlines() if x.startswith("interrupted: rerun the same command")]
    assert said and f"resume {run} from epoch " in said[0], err[-3000:]
    info = json.loads((run / "mlflow_run.json").read_text())
    client = MlflowClient(info["uri"])
    killed = client.get_run(info["run_id"]).info
    assert killed.status == "KILLED" and killed.end_time, killed
    epoch, step = (int(x) for x in said[0].split("from epoch ")[1].split(" step "))
    assert epoch >= 2 and step >= 10, said

    again = _train(tmp_path, data_dir, epoch + 1, "exvae_dist.train", *ray_args)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"resuming {run} from epoch {epoch} step {step}" in err, err[-3000:]
    assert "RunConfig(name)" not in err + out
    assert client.get_run(info["run_id"]).info.status == "FINISHED"
    recs = [json.loads(x) for x in _lines(run / "metrics.jsonl")]
    loss = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    assert [s for s, _ in loss] == list(range(1, 6 * (epoch + 1) + 1))  # each step once
    history = sorted((m.step, m.value) for m in client.get_metric_history(info["run_id"], "loss"))
    assert history == [(s, pytest.approx(v)) for s, v in loss]
