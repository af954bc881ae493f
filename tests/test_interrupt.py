"""Ctrl-C: the trainer exits 130, its MLflow run is KILLED, and the rerun resumes it with every
step logged once (metrics.jsonl and MLflow alike)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _train(tmp_path, data_dir, epochs):
    env = {**os.environ, "EXVAE_DATA_DIR": str(data_dir)}
    return subprocess.Popen(
        [sys.executable, "-m", "exvae_dist.trainer", "--config", "smoke",
         f"train.run_dir={tmp_path}", f"train.epochs={epochs}", "data.n_train=300",
         "data.n_valid=100", "train.log_every=1", "train.progress=false",
         "tracking.sample_grid=false"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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
