"""The one-process trainer on real MNIST: it learns, checkpoints, resumes, and fails clearly."""

import json
import os

import numpy as np
import pytest
import torch

from exvae_dist import config as config_mod
from exvae_dist.runs.checkpoint import find_checkpoint, load_checkpoint
from exvae_dist.core.loop import EarlyStopping, MetricsLog, TimeBudget
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
    for key in ("ray.num_workers=2", "index.kind=ivfpq", "index.store_path=/tmp/s.zarr"):
        with pytest.raises(config_mod.ConfigError, match="no effect in the one-process"):
            fit(smoke_cfg(tmp_path, key, "tracking.enabled=false"))


def test_write_back_puts_the_steps_fresh_means_into_the_cache(tmp_path, data_dir):
    """prior.write_back: after a RAT step, the cached rows of its candidates are the means the
    step encoded (the weights before the update), in the cache and in its search alike."""
    import copy

    import numpy as np

    from exvae_dist.core import loop
    from exvae_dist.data import load_dataset
    from exvae_dist.core.objective import encode_means
    from exvae_dist.core.step import train_step
    from exvae_dist.train.local import build_parts

    cfg = config_mod.load("smoke", [f"train.run_dir={tmp_path}", "data.n_train=500",
                                    "data.n_valid=50", "tracking.enabled=false",
                                    "tracking.sample_grid=false", "prior.write_back=true"],
                          env={"EXVAE_DATA_DIR": str(data_dir)})
    parts = build_parts(cfg, load_dataset(cfg.data))
    state, sampler, _ = loop.start(parts)
    ids = np.arange(50, 100)  # a first step moves the weights away from the cache's
    x = loop.binarize(parts.train_images[ids], True, 0, 0, 0)
    train_step(parts.wrapped, state.optimizer, x, sampler(parts.model, ids, x, 0), 1.0)
    before = copy.deepcopy(parts.model.net)
    stale = parts.cache.centres().clone()
    ids = np.arange(50)
    x = loop.binarize(parts.train_images[ids], True, 0, 0, 0)
    prior = sampler(parts.model, ids, x, 1)
    train_step(parts.wrapped, state.optimizer, x, prior, 1.0)
    assert not torch.allclose(stale[torch.from_numpy(prior.ids)], prior.encoded, atol=1e-4)
    parts.cache.write_back(prior.ids, prior.encoded)
    rows = torch.from_numpy(prior.ids)
    expected = encode_means(before, parts.train_images[rows])
    torch.testing.assert_close(parts.cache.centres()[rows], expected, rtol=1e-5, atol=1e-5)
    search = parts.cache.search
    torch.testing.assert_close(search._half_sq[rows], 0.5 * (expected * expected).sum(1),
                               rtol=1e-5, atol=1e-5)
    others = torch.ones(len(stale), dtype=torch.bool)
    others[rows] = False
    assert torch.equal(parts.cache.centres()[others], stale[others])  # nothing else moved
    with pytest.raises(config_mod.ConfigError, match="write_back"):
        config_mod.check_trainer_keys(cfg, "ray")


def test_curves_overlays_runs_and_names_a_folder_without_metrics(tmp_path, smoke_cfg):
    from exvae_dist.runs.curves import epoch_records, main

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


def test_cell_batches_draw_each_exemplar_once_from_few_cells():
    from exvae_dist.core.loop import CellBatches

    rng = np.random.default_rng(0)
    cells = rng.permutation(np.repeat(np.arange(40), 25))  # 40 cells of 25 = 1,000 ids
    batches = CellBatches(cells, 100, seed=0, epoch=3)
    ids = np.concatenate(list(batches))
    assert len(batches) == 10 and sorted(ids) == list(range(1000))  # each id once
    # a batch spans the 4 (here: 4 to 5) cells it is cut from, not ~40 as a random one
    assert max(len(set(cells[b])) for b in batches) <= 5
    again = CellBatches(cells, 100, seed=0, epoch=3)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # keyed
    other = CellBatches(cells, 100, seed=0, epoch=4)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))
    assert len(CellBatches(cells, 100, 0, 0, max_steps=3)) == 3


def test_local_batching_retrieves_fewer_distinct_candidates(tmp_path, smoke_cfg):
    common = ("train.epochs=2", "tracking.enabled=false", "train.log_every=1")
    fit(smoke_cfg(tmp_path, "train.name=random", *common))
    fit(smoke_cfg(tmp_path, "train.name=local", "train.batching=local", *common))
    def candidates(name):  # epoch 2: the cells come from a trained encoder's latents
        return np.mean([r["candidates"] for r in records(tmp_path / name)
                        if "candidates" in r and r.get("epoch") == 1])
    assert candidates("local") < 0.8 * candidates("random")
    with pytest.raises(config_mod.ConfigError, match="train.batching=local"):
        smoke_cfg(tmp_path, "train.batching=local", "prior.kind=gaussian")
    with pytest.raises(config_mod.ConfigError, match="train.batching=local"):
        config_mod.check_trainer_keys(smoke_cfg(tmp_path, "train.batching=local"), "ray")
