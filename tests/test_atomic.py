"""One atomic-write helper and the sweep of killed writers' temps: unique temp names,
nothing half-written, orphans of dead pids removed at the next start, live writers' temps
kept."""

import json
import subprocess

import numpy as np
import pytest

from exvae_dist.common import atomic
from exvae_dist.runs import checkpoint as ckpt


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_temp_names_are_unique_in_the_same_folder_and_keep_the_suffix(tmp_path):
    a, b = atomic.temp_path(tmp_path / "grid.png"), atomic.temp_path(tmp_path / "grid.png")
    assert a != b and a.parent == tmp_path and a.suffix == ".png"
    assert atomic.orphan_pid(a.name) is not None


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = atomic.write_text(tmp_path / "summary.json", "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(path, fsync=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]
    atomic.write_bytes(path, b"new", fsync=True)
    assert path.read_text() == "new" and sorted(tmp_path.iterdir()) == [path]


def test_a_folder_is_renamed_only_when_complete(tmp_path):
    with pytest.raises(ValueError):
        with atomic.atomic_dir(tmp_path / "v000001") as tmp:
            (tmp / "set.json").write_text("{}")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic.atomic_dir(tmp_path / "v000001") as tmp:
        (tmp / "set.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["v000001"]


def test_the_sweep_removes_dead_writers_temps_only(tmp_path):
    dead = dead_pid()
    orphans = [tmp_path / f".metrics.jsonl.{dead}.tmp",  # jsonio's old scheme
               tmp_path / f".v000002.tmp-{dead}",  # exemplars add's old folder
               tmp_path / f".grid.png.tmp-{dead}-0123abcd.png",
               tmp_path / f".v000003.tmp-{dead}-0123abcd"]
    for p in orphans:
        p.mkdir() if "v0000" in p.name else p.write_text("x")
    (orphans[1] / "store.zarr").mkdir()
    live = atomic.temp_path(tmp_path / "metrics.jsonl")  # this process: a live writer
    live.write_text("x")
    keep = tmp_path / "metrics.jsonl"
    keep.write_text("{}")
    assert sorted(atomic.sweep_temps(tmp_path)) == sorted(orphans)
    assert sorted(tmp_path.iterdir()) == sorted([live, keep])


def test_a_run_folder_sweep_takes_the_metrics_and_checkpoint_temps_of_a_killed_run(tmp_path):
    dead = dead_pid()
    ckpt.save_checkpoint(tmp_path / ckpt.LATEST, {"epoch": 1})
    left = [tmp_path / f".metrics.jsonl.{dead}.tmp",
            tmp_path / f".checkpoint.pt.tmp-{dead}-0123abcd.pt"]
    for p in left:
        p.write_bytes(b"torn")
    removed = ckpt.sweep_run_folder(tmp_path)
    assert sorted(removed) == sorted(left)
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.LATEST]


def test_exemplars_add_sweeps_the_folder_a_killed_add_left(tmp_path):
    """`exemplars add` killed mid-write left its .tmp-<pid> folder forever."""
    from test_exemplar_sets import D, _tiny

    from exvae_dist.evaluation.exemplar_sets import add_exemplars, sets_dir

    run, splits = _tiny(tmp_path)
    stale = sets_dir(tmp_path) / f".v000002.tmp-{dead_pid()}"
    (stale / "store.zarr").mkdir(parents=True)
    new = np.random.default_rng(1).random((5, D)).astype(np.float32)
    assert add_exemplars(run, new, np.zeros(5, int), "batch", splits) == 2
    assert sorted(p.name for p in sets_dir(tmp_path).iterdir()) == ["v000001", "v000002"]
    assert json.loads((sets_dir(tmp_path) / "v000002" / "set.json").read_text())["n"] == 45
