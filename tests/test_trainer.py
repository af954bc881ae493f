"""The one-process trainer on real MNIST: it learns, checkpoints, resumes, and fails clearly."""

import json

import pytest
import torch

from exvae_dist import config as config_mod
from exvae_dist.checkpoint import find_checkpoint, load_checkpoint
from exvae_dist.trainer import EarlyStopping, MetricsLog, fit


@pytest.fixture
def smoke_cfg(data_dir):
    """A 1,000-image MNIST run in tmp_path: smoke_cfg(tmp_path, "key=value", ...)."""
    def make(tmp_path, *extra):
        return config_mod.load("smoke", [f"train.run_dir={tmp_path}", "train.progress=false",
                                         "data.n_train=1000", "data.n_valid=200", *extra],
                               env={"EXVAE_DATA_DIR": str(data_dir)})
    return make


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rat_training_lowers_loss_and_resumes(tmp_path, smoke_cfg):
    cfg = smoke_cfg(tmp_path, "train.epochs=2", "tracking.enabled=false")
    first = fit(cfg)
    run = cfg.run_path()
    epochs = [r for r in records(run) if "val_elbo" in r]
    assert len(epochs) == 2
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    steps_done = first["step"]
    assert steps_done == 20  # 1000 images / batch 100, two epochs

    # rerunning with more epochs continues from epoch 2 rather than starting over
    again = fit(smoke_cfg(tmp_path, "train.epochs=3", "tracking.enabled=false"))
    assert again["epoch"] == 3 and again["step"] == steps_done + 10
    assert len([r for r in records(run) if "val_elbo" in r]) == 3
    state = load_checkpoint(find_checkpoint(run, prefer_best=False))
    assert state["epoch"] == 3


def test_rat_candidates_exclude_batch_element_and_are_counted(tmp_path, smoke_cfg):
    cfg = smoke_cfg(tmp_path, "train.epochs=1", "tracking.enabled=false", "train.log_every=1")
    fit(cfg)
    steps = [r for r in records(cfg.run_path()) if "candidates" in r]
    assert steps and all(0 < r["candidates"] <= 100 * cfg.prior.k for r in steps)
    assert all(r["short_rows"] == 0 for r in steps)


@pytest.mark.parametrize("prior", ["gaussian", "vampprior"])
def test_other_priors_train(tmp_path, prior, smoke_cfg):
    cfg = smoke_cfg(tmp_path, "train.epochs=1", f"prior.kind={prior}", "prior.n_pseudo=20",
                    "tracking.enabled=false")
    summary = fit(cfg)
    assert torch.isfinite(torch.tensor(summary["val_elbo"]))


def test_mlflow_run_holds_metrics_and_sample_grid(tmp_path, smoke_cfg):
    from mlflow.tracking import MlflowClient

    cfg = smoke_cfg(tmp_path, "train.epochs=1")
    fit(cfg)
    info = json.loads((cfg.run_path() / "mlflow_run.json").read_text())
    client = MlflowClient(info["uri"])
    run = client.get_run(info["run_id"])
    assert "val_elbo" in run.data.metrics and run.data.params["prior.k"] == "10"
    samples = [a.path for a in client.list_artifacts(info["run_id"], "samples")]
    assert samples == ["samples/epoch_0001.png"]


def test_corrupt_checkpoint_is_reported(tmp_path, smoke_cfg):
    cfg = smoke_cfg(tmp_path, "train.epochs=1", "tracking.enabled=false")
    fit(cfg)
    # every checkpoint of the run unreadable (one alone is skipped for the others: test_faults)
    for name in ("checkpoint.pt", "best.pt"):
        (cfg.run_path() / name).write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="unreadable"):
        fit(cfg)


def test_missing_run_dir_is_reported(tmp_path, smoke_cfg):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")


def test_early_stopping_ignores_warmup_epochs():
    stop = EarlyStopping(patience=2, warmup_epochs=3)
    for epoch, value in enumerate([-10, -11, -12, -13, -14]):
        stop.update(epoch, value)
    # epochs 0-2 are warm-up: only epochs 3 and 4 count as bad
    assert stop.best_epoch == 0 and stop.bad_epochs == 2 and stop.should_stop


def test_metrics_log_rewind_drops_records_of_a_dead_attempt(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": float(step)})
    log.write({"step": 4, "epoch": 1, "val_elbo": -100.0})  # the epoch record: same step
    log.write({"step": 5, "loss": 5.0})
    with open(log.path, "a") as f:
        f.write('{"step": 6, "lo')  # cut short by the crash
    assert log.rewind(4) == 2
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4]
    assert log.rewind(4) == 0
    assert MetricsLog(tmp_path / "absent.jsonl").rewind(0) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, smoke_cfg):
    with pytest.raises(config_mod.ConfigError, match="train.device=cuda.*no CUDA"):
        fit(smoke_cfg(tmp_path, "train.device=cuda", "tracking.enabled=false"))


def test_rerun_of_a_finished_run_keeps_its_summary(tmp_path, smoke_cfg):
    cfg = smoke_cfg(tmp_path, "train.epochs=1", "tracking.enabled=false")
    first = fit(cfg)
    again = fit(cfg)  # nothing left to train
    saved = json.loads((cfg.run_path() / "summary.json").read_text())
    assert again["val_elbo"] == first["val_elbo"] == saved["val_elbo"]
    assert saved["epoch"] == 1


def test_validation_samples_and_unimplemented_exemplar_mode(tmp_path, smoke_cfg):
    with pytest.raises(config_mod.ConfigError, match="exemplars_grey=false .* not implemented"):
        smoke_cfg(tmp_path, "data.exemplars_grey=false")
    with pytest.raises(config_mod.ConfigError, match="validation_samples must be >= 1"):
        smoke_cfg(tmp_path, "eval.validation_samples=0")
