"""The one-process trainer on real MNIST: it learns, checkpoints, resumes, and fails clearly."""

import json
import os

import pytest
import torch

from exvae_dist import config as config_mod
from exvae_dist.runs.checkpoint import find_checkpoint, load_checkpoint
from exvae_dist.core.loop import EarlyStopping, TimeBudget
from exvae_dist.runs.recorder import MetricsLog
from exvae_dist.train.local import fit


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
    # a row is short when fewer than k of its k' = 2kN/M retrieved neighbours won their coin
    # (a binomial tail of ~2e-4 per row here): rare, and counted, never padded
    assert sum(r["short_rows"] for r in steps) <= 0.01 * 100 * len(steps)


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
    assert run.data.tags["hardware.cores"] == str(os.cpu_count())
    assert [a.path for a in client.list_artifacts(info["run_id"], "curves")] == [
        "curves/curves.png"]
    assert run.data.tags["hardware.torch"] == torch.__version__


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


def test_time_budget_starts_no_epoch_the_mean_says_would_not_fit():
    assert not TimeBudget(None, [1e9]).exhausted()
    assert not TimeBudget(1e-9, []).exhausted()  # the first epoch always starts
    assert not TimeBudget(1.0, [1000.0, 1000.0]).exhausted()  # 3000 s <= 3600 s
    assert TimeBudget(1.0, [1000.0, 1000.0, 1000.0]).exhausted()  # 4000 s > 3600 s
    assert TimeBudget(1.0, [3000.0, 100.0]).exhausted()  # mean 1550 s: 4650 s


def test_time_budget_counts_the_earlier_sessions_of_a_run(tmp_path, smoke_cfg):
    common = ("train.max_steps_per_epoch=1", "tracking.enabled=false")
    fit(smoke_cfg(tmp_path, "train.epochs=2", *common))
    run = smoke_cfg(tmp_path).run_path()
    walls = [r["epoch_seconds"] for r in records(run) if "epoch_seconds" in r]
    assert len(walls) == 2
    # resumed with room for half an epoch more: no epoch starts, and the summary says why
    hours = (sum(walls) + 0.5 * sum(walls) / 2) / 3600
    summary = fit(smoke_cfg(tmp_path, "train.epochs=10", f"train.time_budget_hours={hours}",
                            *common))
    saved = json.loads((run / "summary.json").read_text())
    assert saved["stopped_by_time_budget"] and saved["epoch"] == 2
    assert summary["wall_seconds"] == pytest.approx(sum(walls))


def test_validation_samples_must_be_positive(tmp_path, smoke_cfg):
    with pytest.raises(config_mod.ConfigError, match="validation_samples must be >= 1"):
        smoke_cfg(tmp_path, "eval.validation_samples=0")


def test_exact_subset_prior_trains(tmp_path, smoke_cfg):
    """prior.rat=false: every step re-encodes an exact M-subset with leave-one-out."""
    cfg = smoke_cfg(tmp_path, "train.epochs=2", "prior.rat=false", "prior.subsample=300",
                    "tracking.enabled=false", "train.log_every=1")
    fit(cfg)
    recs = records(cfg.run_path())
    steps = [r for r in recs if "loss" in r and "val_elbo" not in r]
    assert all(r["candidates"] == 300 for r in steps)
    epochs = [r for r in recs if "val_elbo" in r]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert torch.isfinite(torch.tensor(epochs[1]["val_elbo"]))


def _same_state(a: dict, b: dict) -> None:
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for name in opt_a[i]:
            assert torch.equal(opt_a[i][name], opt_b[i][name]), (i, name)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, smoke_cfg):
    common = ("tracking.enabled=false", "train.log_every=1", "prior.refresh_every=4")
    whole = smoke_cfg(tmp_path, "train.name=whole", "train.epochs=2", *common)
    fit(whole)
    parts = smoke_cfg(tmp_path, "train.name=parts", "train.epochs=1", *common)
    fit(parts)
    fit(smoke_cfg(tmp_path, "train.name=parts", "train.epochs=2", *common))  # resumes at 10
    _same_state(load_checkpoint(whole.run_path() / "checkpoint.pt"),
                load_checkpoint(parts.run_path() / "checkpoint.pt"))
    drop = ("train_seconds", "epoch_seconds", "refresh_seconds", "refresh_share",
            "train_thread_cpu_share",
            "examples_per_second",
            "step_ms_steady", "step_ms_during_rebuild")
    a = [{k: v for k, v in r.items() if k not in drop} for r in records(whole.run_path())]
    b = [{k: v for k, v in r.items() if k not in drop} for r in records(parts.run_path())]
    assert len(a) == 22 and a == b  # 20 steps + 2 epochs, every number equal
    # each start is recorded with its machine; the wall time sums both sessions' epochs
    sessions = [json.loads(line) for line in
                (parts.run_path() / "sessions.jsonl").read_text().splitlines()]
    assert [s["from_epoch"] for s in sessions] == [0, 1]
    assert sessions[0]["cores"] == os.cpu_count() and sessions[0]["torch"] == torch.__version__
    summary = json.loads((parts.run_path() / "summary.json").read_text())
    epochs = [r["epoch_seconds"] for r in records(parts.run_path()) if "epoch_seconds" in r]
    assert len(epochs) == 2 and summary["wall_seconds"] == pytest.approx(sum(epochs))
    assert summary["sessions"] == 2 and len(summary["machines"]) == 1


def test_early_stopping_stops_and_best_holds_the_best_epoch(tmp_path, smoke_cfg):
    from exvae_dist.evaluation.runs import load_run

    # a learning rate this small leaves the model as it is, so the one-sample validation ELBO
    # moves by noise alone and stops improving within a few epochs
    cfg = smoke_cfg(tmp_path, "train.epochs=12", "train.warmup_epochs=0",
                    "train.early_stop_patience=2", "train.lr=1e-12",
                    "train.max_steps_per_epoch=1", "tracking.enabled=false")
    summary = fit(cfg)
    run = cfg.run_path()
    vals = [r["val_elbo"] for r in records(run) if "val_elbo" in r]
    best_epoch = max(range(len(vals)), key=vals.__getitem__) + 1
    assert summary["stopped_early"] and len(vals) < 12
    assert len(vals) == best_epoch + 2  # two epochs without improvement after the best
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == best_epoch and best["early_stopping"]["best"] == max(vals)
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == len(vals)
    # evaluate's eval.checkpoint picks one or the other
    assert load_run(str(run), [], env={}).epoch == best_epoch
    assert load_run(str(run), ["eval.checkpoint=latest"], env={}).epoch == len(vals)


def test_tracking_uri_sends_the_run_elsewhere(tmp_path, smoke_cfg):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    cfg = smoke_cfg(tmp_path, "train.epochs=1", "train.max_steps_per_epoch=2",
                    f"tracking.uri={uri}", "tracking.sample_grid=false")
    fit(cfg)
    info = json.loads((cfg.run_path() / "mlflow_run.json").read_text())
    assert info["uri"] == uri and not (tmp_path / "mlflow.db").exists()
    assert "val_elbo" in MlflowClient(uri).get_run(info["run_id"]).data.metrics


def test_ray_and_index_keys_are_refused_by_the_one_process_trainer(tmp_path, smoke_cfg):
    for key in ("ray.num_workers=2", "index.kind=flat", "index.store_path=/tmp/s.zarr"):
        with pytest.raises(config_mod.ConfigError, match="no effect in the one-process"):
            fit(smoke_cfg(tmp_path, key, "tracking.enabled=false"))


def test_curves_overlays_runs_and_names_a_folder_without_metrics(tmp_path, smoke_cfg):
    from exvae_dist.commands.curves import main
    from exvae_dist.runs.curves import epoch_records

    cfg = smoke_cfg(tmp_path, "train.epochs=2", "tracking.enabled=false")
    fit(cfg)
    assert (cfg.run_path() / "curves.png").is_file()  # drawn by the loop every epoch
    assert [r["epoch"] for r in epoch_records(cfg.run_path())] == [1, 2]
    out = tmp_path / "both.png"
    main([str(cfg.run_path()), str(cfg.run_path()), "--out", str(out), "--labels", "a,b"])
    assert out.stat().st_size > 1000 and not list(tmp_path.glob("*.tmp.png"))
    kept = tmp_path / "kept" / "smoke.jsonl"  # the epoch records alone, plotted without the run
    main([str(cfg.run_path()), "--keep", str(kept)])
    assert epoch_records(kept) == epoch_records(cfg.run_path())
    assert len(kept.read_text().splitlines()) == 2
    main([str(kept), "--out", str(out)])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        main([str(tmp_path / "nothing"), "--out", str(out)])


def test_a_mid_epoch_resume_equals_an_uninterrupted_run_and_mlflow_equals_metrics(
        tmp_path, smoke_cfg, monkeypatch):
    """train.checkpoint_every_steps: a run stopped mid-epoch resumes from its mid-epoch
    checkpoint and ends as the uninterrupted run, to the last bit; MLflow holds each step
    once, with the values metrics.jsonl holds, although the dead attempt computed other
    values for the steps it trained past its checkpoint (as an asynchronous refresh may)."""
    from mlflow.tracking import MlflowClient

    from exvae_dist.core import loop

    common = ("train.log_every=1", "prior.refresh_every=2", "train.checkpoint_every_steps=3",
              "train.epochs=2", "tracking.sample_grid=false")
    whole = smoke_cfg(tmp_path, "train.name=whole", "tracking.enabled=false", *common)
    fit(whole)
    parts = smoke_cfg(tmp_path, "train.name=parts", *common)
    real_step, calls = loop.train_step, []

    def dying_step(*args, **kwargs):  # attempt 1: other numbers after step 14, dies in 17
        calls.append(1)
        if len(calls) == 17:
            raise KeyboardInterrupt
        m = real_step(*args, **kwargs)
        return {**m, "loss": m["loss"] + 1000.0} if len(calls) > 14 else m

    monkeypatch.setattr(loop, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        fit(parts)
    # refreshes at steps 2, 4, 6, ... of each epoch; checkpoints at the first refresh 3 or
    # more steps after the last one: 4, 8, 10 (epoch end), 14 (the resume point), 18
    saved = load_checkpoint(parts.run_path() / "checkpoint.pt")
    assert (saved["epoch"], saved["step"], saved["within_epoch"]["batch"]) == (1, 14, 4)
    monkeypatch.setattr(loop, "train_step", real_step)
    fit(parts)
    _same_state(load_checkpoint(whole.run_path() / "checkpoint.pt"),
                load_checkpoint(parts.run_path() / "checkpoint.pt"))
    drop = ("train_seconds", "epoch_seconds", "refresh_seconds", "refresh_share",
            "train_thread_cpu_share",
            "examples_per_second", "step_ms_steady", "step_ms_during_rebuild")
    a = [{k: v for k, v in r.items() if k not in drop} for r in records(whole.run_path())]
    b = [{k: v for k, v in r.items() if k not in drop} for r in records(parts.run_path())]
    assert len(a) == 22 and a == b
    info = json.loads((parts.run_path() / "mlflow_run.json").read_text())
    client = MlflowClient(info["uri"])
    for key in ("loss", "kl"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(info["run_id"], key))
        assert history == [(r["step"], pytest.approx(r[key])) for r in b if key in r], key
    assert len(client.get_metric_history(info["run_id"], "val_elbo")) == 2


def test_a_one_process_run_that_fails_before_training_is_failed_in_mlflow(tmp_path, smoke_cfg,
                                                                         monkeypatch):
    """The MLflow run exists before the data is read: a start that fails there is in MLflow,
    FAILED with an end time (it did not appear at all before)."""
    from mlflow.tracking import MlflowClient

    from exvae_dist.train import local

    def broken(cfg):
        raise OSError("the data disk went away")

    monkeypatch.setattr(local, "load_dataset", broken)
    cfg = smoke_cfg(tmp_path, "tracking.sample_grid=false")
    with pytest.raises(OSError, match="went away"):
        fit(cfg)
    info = json.loads((cfg.run_path() / "mlflow_run.json").read_text())
    failed = MlflowClient(info["uri"]).get_run(info["run_id"]).info
    assert failed.status == "FAILED" and failed.end_time, failed


def test_the_fast_recipe_loads_and_trains_on_its_cosine_schedule(tmp_path, data_dir):
    # configs/mnist_vae_exemplar_fast.yaml as shipped, cut to 3 short epochs: the
    # paper's model and prior, and each epoch's Adam rate is the cosine of
    # objective.learning_rate over the recipe's own schedule length
    fast = config_mod.load("mnist_vae_exemplar_fast", [], env={})
    paper = config_mod.load("mnist_vae_exemplar", [], env={})
    assert fast.model == paper.model and fast.prior == paper.prior
    assert (fast.train.lr_schedule, fast.train.epochs, fast.train.warmup_epochs) == ("cosine", 65, 10)
    assert fast.train.lr == 2e-3
    cfg = config_mod.load("mnist_vae_exemplar_fast", [
        f"train.run_dir={tmp_path}", "train.progress=false", "data.n_train=500",
        "data.n_valid=100", "train.epochs=3", "train.warmup_epochs=2",
        "train.max_steps_per_epoch=3", "tracking.enabled=false", "train.threads=1"],
        env={"EXVAE_DATA_DIR": str(data_dir)})
    summary = fit(cfg)
    epochs = [r for r in records(cfg.run_path()) if "val_elbo" in r]
    assert [r["lr"] for r in epochs] == pytest.approx([2e-3, 1.5e-3, 5e-4])
    assert summary["epoch"] == 3 and all(r["val_elbo"] < 0 for r in epochs)
    state = load_checkpoint(find_checkpoint(cfg.run_path(), prefer_best=False))
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)


def test_thread_cpu_share_drops_when_the_training_thread_waits(tmp_path, smoke_cfg, monkeypatch):
    """train_thread_cpu_share tells a waiting worker from a busy one: a step that sleeps
    50 ms (off the CPU) pulls it well below a plain run's."""
    import time

    from exvae_dist.core import loop

    def share(cfg):
        fit(cfg)
        return [r for r in records(cfg.run_path()) if "val_elbo" in r][-1]["train_thread_cpu_share"]

    args = ("train.epochs=1", "tracking.enabled=false", "train.threads=1")
    plain = share(smoke_cfg(tmp_path / "plain", *args))
    real_step = loop.train_step

    def waiting_step(*a, **kw):
        time.sleep(0.05)
        return real_step(*a, **kw)

    monkeypatch.setattr(loop, "train_step", waiting_step)
    waited = share(smoke_cfg(tmp_path / "waited", *args))
    assert 0 < waited < 0.6 * plain and plain <= 1.001, (plain, waited)
