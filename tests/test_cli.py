"""The `exvae` console front and the one exception boundary of every command (cli.guarded):
known errors print one line and exit non-zero, also when Ray wraps them; on Ray a
deterministic worker error ends the run without a retry."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from exvae_dist.commands import cli
from exvae_dist.config import ConfigError
from exvae_dist.common.errors import find_known

REPO = Path(__file__).resolve().parent.parent
SHORT = ["data.n_train=300", "data.n_valid=100", "data.n_test=20", "train.progress=false",
         "tracking.enabled=false", "train.threads=1", "train.epochs=1"]


def test_pyproject_declares_the_console_command():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["exvae"].partition(":")
    assert (module, func) == ("exvae_dist.commands.cli", "main")


def test_front_help_lists_every_command_once(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(cli.COMMANDS)
    for name, (module, _) in cli.COMMANDS.items():  # each runs a module with a main(argv)
        assert callable(getattr(__import__(module, fromlist=["main"]), "main")), name
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_subcommand_help_names_the_front(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage: exvae evaluate")


class _Wrapped(Exception):
    """Stands in for Ray Train's wrappers (matched by attribute, as errors.find_known does)."""


def test_known_errors_are_found_through_ray_wrappers():
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    fpe = FloatingPointError("non-finite loss nan")
    group = WorkerGroupError("rank 0 failed",
                             {0: UserExceptionWithTraceback(fpe, "Traceback ..."),
                              1: RuntimeError("collateral")})
    assert find_known(group) is fpe
    cfg_err = ConfigError("bad key")
    assert find_known(ControllerError(cfg_err)) is cfg_err
    assert find_known(ControllerError(RuntimeError("a bug"))) is None
    assert find_known(KeyError("x")) is None


def test_guarded_prints_one_line_and_exits_non_zero(capsys):
    def fails(_):
        from ray.train import WorkerGroupError

        raise WorkerGroupError("x", {0: FloatingPointError("non-finite loss\nlower train.lr")})

    assert cli.guarded(fails, []) == cli.EXIT_KNOWN_ERROR
    err = capsys.readouterr().err
    assert err == "error: non-finite loss lower train.lr\n"

    def config(_):
        raise ConfigError("train.lr must be positive")

    assert cli.guarded(config, []) == cli.EXIT_USAGE

    def bug(_):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        cli.guarded(bug, [])


def _env(data_dir):
    return {**os.environ, "PYTHONPATH": str(REPO), "EXVAE_DATA_DIR": str(data_dir)}


def test_a_diverging_run_is_one_line_without_traceback(tmp_path, data_dir):
    done = subprocess.run([sys.executable, "-m", "exvae_dist.trainer", "--config", "smoke",
                           "train.lr=1e6", f"train.run_dir={tmp_path}", *SHORT],
                          capture_output=True, text=True, env=_env(data_dir), timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: non-finite loss")


def test_a_locked_run_is_one_line_without_traceback(tmp_path, data_dir):
    from exvae_dist.runs.run_lock import RunLock

    with RunLock(tmp_path / "smoke"):  # held by this (live) process
        done = subprocess.run([sys.executable, "-m", "exvae_dist.trainer", "--config",
                               "smoke", f"train.run_dir={tmp_path}", *SHORT],
                              capture_output=True, text=True, env=_env(data_dir), timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run folder") and "in use by another run" in last


@pytest.mark.slow
def test_a_deterministic_worker_error_is_not_retried_on_ray(tmp_path, data_dir):
    done = subprocess.run([sys.executable, "-m", "exvae_dist.train", "--config", "smoke",
                           "train.lr=1e6", f"train.run_dir={tmp_path}", "ray.num_workers=1",
                           "ray.max_failures=2", *SHORT],
                          capture_output=True, text=True, env=_env(data_dir), timeout=400)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: non-finite loss")
    # each start of the training loop appends one session record: one start, no retry
    sessions = (tmp_path / "smoke" / "sessions.jsonl").read_text().splitlines()
    assert len(sessions) == 1, sessions


def test_console_script_entry_runs_help_in_a_fresh_process():
    """What pip's `exvae` wrapper runs: `sys.exit(exvae_dist.commands.cli.main())`."""
    entry = "import sys; from exvae_dist.commands.cli import main; sys.exit(main())"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, first in ((["--help"], "usage: exvae <command>"),
                        (["train", "--help"], "usage: exvae train")):
        done = subprocess.run([sys.executable, "-c", entry, *args], capture_output=True,
                              text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.startswith(first)
