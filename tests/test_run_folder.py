"""Run folders: a rerun resumes only with the same defining settings; job temp dirs refused."""

import json

import numpy as np
import pytest
import yaml

from exvae_dist import config as config_mod
from exvae_dist.runs.run_folder import (FINGERPRINT, IDENTITY, RunFolderError, fingerprint,
                                        prepare, temporary_working_dir)


def cfg_at(tmp_path, *overrides):
    return config_mod.load("smoke", [f"train.run_dir={tmp_path}", *overrides], env={})


def trained(tmp_path, *overrides):
    """A first attempt that got as far as a checkpoint (trained state to protect)."""
    folder = prepare(cfg_at(tmp_path, *overrides))
    (folder.path / "checkpoint.pt").write_text("trained")
    return folder


def test_first_start_records_the_fingerprint_and_a_rerun_resumes(tmp_path):
    first = prepare(cfg_at(tmp_path))
    assert not first.resumed and (first.path / FINGERPRINT).is_file()
    record = json.loads((first.path / FINGERPRINT).read_text())
    assert record["fingerprint"]["train.lr"] == first.fingerprint["train.lr"]
    # epochs, evaluation, tracking and worker counts are not what defines the run
    again = prepare(cfg_at(tmp_path, "train.epochs=50", "ray.num_workers=2", "eval.n_samples=9",
                           "tracking.enabled=false", "train.early_stop_patience=3"))
    assert again.resumed and again.changed == {}


@pytest.mark.parametrize("override, key", [
    ("train.warmup_epochs=10", "train.warmup_epochs"), ("train.lr=0.01", "train.lr"),
    ("prior.k=3", "prior.k"), ("model.z_dim=8", "model.z_dim"), ("data.n_train=500", "data.n_train"),
    ("train.batch_size=50", "train.batch_size")])
def test_a_changed_setting_is_refused_with_the_ways_on(tmp_path, override, key):
    trained(tmp_path)
    before = (cfg_at(tmp_path).run_path() / "config.yaml").read_text()
    with pytest.raises(RunFolderError) as err:
        prepare(cfg_at(tmp_path, override))
    message = str(err.value)
    assert key in message and "train.name=" in message and "train.overwrite=true" in message
    # the run's record is untouched by the refused attempt
    assert (cfg_at(tmp_path).run_path() / "config.yaml").read_text() == before


def test_a_cosine_schedule_binds_the_epoch_count_and_a_constant_one_does_not(tmp_path):
    # cosine: train.epochs sets every epoch's learning rate, so a rerun with another count
    # would mix two schedules in one run; constant (above): epochs may grow freely
    trained(tmp_path, "train.lr_schedule=cosine", "train.epochs=60")
    assert prepare(cfg_at(tmp_path, "train.lr_schedule=cosine", "train.epochs=60")).resumed
    with pytest.raises(RunFolderError, match="train.epochs"):
        prepare(cfg_at(tmp_path, "train.lr_schedule=cosine", "train.epochs=80"))
    with pytest.raises(RunFolderError, match="train.lr_schedule"):
        prepare(cfg_at(tmp_path, "train.epochs=60"))


def test_allow_changed_resumes_and_records_the_change(tmp_path):
    trained(tmp_path)
    folder = prepare(cfg_at(tmp_path, "train.warmup_epochs=10", "train.allow_changed=true"))
    assert folder.resumed and set(folder.changed) == {"train.warmup_epochs"}
    record = json.loads((folder.path / FINGERPRINT).read_text())
    assert record["fingerprint"]["train.warmup_epochs"] == 10
    assert record["changes"][0]["changed"]["train.warmup_epochs"]["now"] == 10
    assert prepare(cfg_at(tmp_path, "train.warmup_epochs=10")).resumed  # the new settings hold


def test_allow_changed_cannot_change_the_model_shape(tmp_path):
    trained(tmp_path)
    with pytest.raises(RunFolderError, match=r"model\.z_dim cannot change") as err:
        prepare(cfg_at(tmp_path, "model.z_dim=8", "train.allow_changed=true"))
    assert "train.allow_changed=true   resume" not in str(err.value)


def test_overwrite_moves_the_old_run_aside(tmp_path):
    first = prepare(cfg_at(tmp_path))
    (first.path / "checkpoint.pt").write_text("old")
    fresh = prepare(cfg_at(tmp_path, "model.z_dim=8", "train.overwrite=true"), now=0)
    assert not fresh.resumed and not (fresh.path / "checkpoint.pt").exists()
    assert fresh.moved_to.name == "smoke.replaced-19700101T000000Z"
    assert (fresh.moved_to / "checkpoint.pt").read_text() == "old"


def test_the_lock_of_this_attempt_stays_with_the_run_when_the_old_folder_moves(tmp_path):
    """exclusive_run takes <run>/run.lock before prepare() moves an old folder aside: the
    lock must guard the new folder, or a second start could run beside this one."""
    from exvae_dist.runs.run_lock import RunLock

    trained(tmp_path)
    cfg = cfg_at(tmp_path, "model.z_dim=8", "train.overwrite=true")
    with RunLock(cfg.run_path()):
        fresh = prepare(cfg, now=0)
        assert (fresh.path / "run.lock").is_file() and not (fresh.moved_to / "run.lock").exists()
    assert not (fresh.path / "run.lock").exists()  # released as usual


def test_a_run_from_before_fingerprints_is_checked_against_its_config_yaml(tmp_path):
    cfg = cfg_at(tmp_path)
    cfg.run_path().mkdir(parents=True)
    (cfg.run_path() / "config.yaml").write_text(config_mod.to_yaml(cfg))
    (cfg.run_path() / "checkpoint.pt").write_text("trained")
    assert prepare(cfg).resumed
    (cfg.run_path() / FINGERPRINT).unlink()
    with pytest.raises(RunFolderError, match="train.warmup_epochs"):
        prepare(cfg_at(tmp_path, "train.warmup_epochs=10"))


def test_a_run_dir_inside_a_jobs_temporary_working_dir_is_refused(tmp_path):
    job = tmp_path / "ray" / "session_2026-12-01_20-00-00_000000_1" / "runtime_resources" \
        / "working_dir_files" / "_ray_pkg_0123abcd"
    with pytest.raises(RunFolderError, match=r"absolute train\.run_dir"):
        prepare(cfg_at(job / "runs"))
    assert not job.exists()  # refused before anything was written
    # a session folder, known by the session_latest link beside it, wherever Ray's temp is
    session = tmp_path / "elsewhere" / "session_2026-12-07_12-00-00_000000_7"
    session.mkdir(parents=True)
    assert temporary_working_dir(session / "runs" / "x") is None  # no link: not Ray's
    (session.parent / "session_latest").symlink_to(session)
    assert "session folder" in temporary_working_dir(session / "runs" / "x")
    assert "session folder" in temporary_working_dir(session.parent / "session_latest" / "x")
    older = session.parent / "session_2026-12-06_09-00-00_000000_3"  # a past session's folder
    older.mkdir()
    assert "session folder" in temporary_working_dir(older / "runs")
    (session.parent / "session_latest").unlink()
    (session.parent / "session_latest").symlink_to(session.parent / "gone")  # left dangling
    assert "session folder" in temporary_working_dir(older / "runs")
    assert temporary_working_dir(tmp_path / "session_latest" / "runs") is None  # a user's own
    assert temporary_working_dir(tmp_path / "runs") is None


def test_identity_keys_exist_and_exclude_schedule_and_infrastructure():
    keys = fingerprint(config_mod.ExperimentConfig())
    assert set(IDENTITY) == {"data", "model", "prior", "train"}
    for key in ("train.epochs", "ray.num_workers", "train.run_dir", "data.root", "train.name",
                "train.overwrite", "train.allow_changed", "train.device"):
        assert key not in keys


def test_other_training_classes_are_refused_even_with_allow_changed(tmp_path):
    """data.labels picks the training images: a resume on other classes would train the same
    checkpoint on other data, so it is structural."""
    trained(tmp_path, "data.labels=[0,1]")
    with pytest.raises(RunFolderError, match=r"data\.labels cannot change"):
        prepare(cfg_at(tmp_path, "data.labels=[0,1,2]", "train.allow_changed=true"))
    assert prepare(cfg_at(tmp_path, "data.labels=[0,1]")).resumed


def test_classes_are_a_set_and_a_structural_change_never_suggests_allow_changed(tmp_path):
    trained(tmp_path, "data.labels=[0,1]")
    assert prepare(cfg_at(tmp_path, "data.labels=[1,0,1]")).resumed  # the same classes
    with pytest.raises(RunFolderError) as err:
        prepare(cfg_at(tmp_path, "data.labels=[0,2]"))
    assert "data.labels cannot change" in str(err.value)
    assert "train.allow_changed=true   resume" not in str(err.value)


def test_identity_keys_an_old_record_lacks_are_not_compared_when_its_yaml_is_unreadable(
        tmp_path):
    folder = trained(tmp_path, "data.labels=[3]")
    record = json.loads((folder.path / FINGERPRINT).read_text())
    for key in ("data.labels", "data.pixels"):
        del record["fingerprint"][key]
    (folder.path / FINGERPRINT).write_text(json.dumps(record))
    (folder.path / "config.yaml").write_text("data: {no_such_key: 1}\n")
    assert prepare(cfg_at(tmp_path, "data.labels=[3]")).resumed


def test_a_folder_without_trained_state_is_set_aside_for_a_corrected_rerun(tmp_path):
    """An attempt that failed before its first checkpoint (e.g. a NaN at lr=1e6) must not
    block the corrected command; its files are kept beside, never deleted."""
    failed = prepare(cfg_at(tmp_path, "train.lr=1000000"), now=0)
    (failed.path / "sessions.jsonl").write_text("{}\n")
    fixed = prepare(cfg_at(tmp_path), now=0)
    assert not fixed.resumed and fixed.changed == {}
    assert fixed.moved_to.name == "smoke.replaced-19700101T000000Z"
    assert (fixed.moved_to / "sessions.jsonl").is_file()
    assert json.loads((fixed.path / FINGERPRINT).read_text())["fingerprint"]["train.lr"] == 5e-4


def test_identity_keys_added_later_are_read_from_an_older_runs_config_yaml(tmp_path):
    """A fingerprint.json written before data.labels was an identity key: the run's
    config.yaml says which classes it trained on."""
    folder = trained(tmp_path, "data.labels=[3]")
    record = json.loads((folder.path / FINGERPRINT).read_text())
    del record["fingerprint"]["data.labels"]
    (folder.path / FINGERPRINT).write_text(json.dumps(record))
    assert prepare(cfg_at(tmp_path, "data.labels=[3]")).resumed
    record = json.loads((folder.path / FINGERPRINT).read_text())
    del record["fingerprint"]["data.labels"]
    (folder.path / FINGERPRINT).write_text(json.dumps(record))
    with pytest.raises(RunFolderError, match=r"data\.labels"):
        prepare(cfg_at(tmp_path))


def test_a_store_run_records_its_stores_content_and_refuses_another(tmp_path):
    from types import SimpleNamespace

    from exvae_dist.data.ingest import ingest, open_source

    args = SimpleNamespace(labels=None, images_key=None, labels_key=None, data_root=None, seed=0)
    for name, seed in (("a.zarr", 0), ("b.zarr", 1)):
        x = np.random.default_rng(seed).integers(0, 256, (60, 28, 28), dtype=np.uint8)
        np.save(tmp_path / f"{name}.npy", x)
        ingest(open_source(str(tmp_path / f"{name}.npy"), args), tmp_path / name, n_valid=10,
               n_test=10, progress=False)
    store = ["data.name=store", "data.n_train=null"]
    folder = trained(tmp_path, *store, f"data.store={tmp_path / 'a.zarr'}")
    recorded = yaml.safe_load((folder.path / "config.yaml").read_text())["data"]
    assert recorded["store_fingerprint"] and recorded["store_fingerprint"] == \
        folder.fingerprint["data.store_fingerprint"]
    with pytest.raises(RunFolderError, match=r"data\.store_fingerprint cannot change"):
        prepare(cfg_at(tmp_path, *store, f"data.store={tmp_path / 'b.zarr'}",
                       "train.allow_changed=true"))
    (tmp_path / "a.zarr").rename(tmp_path / "moved.zarr")  # the same content elsewhere
    assert prepare(cfg_at(tmp_path, *store, f"data.store={tmp_path / 'moved.zarr'}")).resumed
    with pytest.raises(RunFolderError, match=r"data\.store=.*gone\.zarr"):
        prepare(cfg_at(tmp_path, *store, f"data.store={tmp_path / 'gone.zarr'}"))
    with pytest.raises(RunFolderError, match="point it at the run's own store"):
        prepare(cfg_at(tmp_path, *store, f"data.store={tmp_path / 'b.zarr'}"))
    pinned = f"data.store_fingerprint={folder.fingerprint['data.store_fingerprint']}"
    with pytest.raises(RunFolderError, match=r"not the data\.store_fingerprint=.* asked for"):
        prepare(cfg_at(tmp_path, *store, f"data.store={tmp_path / 'b.zarr'}", pinned,
                       "train.name=other"))
    (tmp_path / "b.zarr" / "zarr.json").write_text("{torn")  # a corrupt store: no traceback
    with pytest.raises(RunFolderError, match=r"b\.zarr cannot be used"):
        prepare(cfg_at(tmp_path, *store, f"data.store={tmp_path / 'b.zarr'}",
                       "train.name=other"))
