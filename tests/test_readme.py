"""The README's commands work as written: every ```bash block runs, in order, in one shell.

The blocks run in a copy of the repository next to a `shared/data` link to the datasets, so
the README's own `export EXVAE_DATA_DIR=...` line is what finds them. Long runs are shortened
by appending smoke-size overrides to each `python -m exvae_dist.<command>` line (a later
`key=value` wins); nothing else is rewritten except what must be on a shared machine:
`setup.sh` is skipped when the venv exists (.ci/run runs it), the test command itself is
left to .ci/run, `ray start` gets free ports, and `ray stop` (which stops every Ray on the
machine) becomes a stop of this test's own Ray processes. Prints each block's wall time.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from own_ray import ray_log_tails, stop_own_ray

REPO = Path(__file__).resolve().parent.parent
PYTEST_LINE = ".venv/bin/python -m pytest -q"
SETUP = "bash scripts/setup.sh"
TRAIN_SHORT = ("train.epochs=1", "train.max_steps_per_epoch=2", "data.n_train=300",
               "data.n_valid=100", "data.n_test=20", "train.progress=false",
               "tracking.enabled=false", "train.threads=1")
EVAL_SHORT = ("eval.n_samples=4", "eval.n_test=4", "eval.pictures=false",
              "eval.knn=false", "train.progress=false", "data.n_train=300")
COMMAND = re.compile(r"-m exvae_dist\.(train|trainer|evaluate|augment)\b")
IGNORED = shutil.ignore_patterns(".git", ".venv", "runs", "stores", "__pycache__", "*.egg-info",
                                 ".pytest_cache", ".docker-build", "mlruns", "out")


def bash_blocks(readme: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", readme, flags=re.S | re.M)


def shorten(block: str) -> str:
    """The block as the test runs it (see the module docstring)."""
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped == PYTEST_LINE:
            continue  # .ci/run runs the suite (asserted below)
        line = line.replace(f"{SETUP} && ", "")
        if line.strip() == SETUP:
            continue
        found = COMMAND.search(line)
        if found:
            short = TRAIN_SHORT if found.group(1) in ("train", "trainer") else EVAL_SHORT
            if "data.name=store" in line:  # an ingested store is used whole on Ray
                short = tuple(o for o in short if not o.startswith("data.n_"))
            line = re.sub(r"\s+#\s.*$", "", line) + " " + " ".join(short)
        if "ray start --head" in line:
            # ports picked when the block runs (own_ray explains the range)
            # (an assignment first: `eval "$(cmd)"` would hide a failing cmd from set -e)
            lines.append(f"ports=$({shlex.quote(sys.executable)} -c 'from tests.own_ray import "
                         "port_exports; print(port_exports())')")
            lines.append('eval "$ports"')
            line += (" --port $RDM_GCS --dashboard-port $RDM_DASHBOARD"
                     " --dashboard-agent-listen-port $RDM_AGENT --ray-client-server-port $RDM_CLIENT")
        line = line.replace("127.0.0.1:8265", "127.0.0.1:$RDM_DASHBOARD")
        line = line.replace("127.0.0.1:52365", "127.0.0.1:$RDM_AGENT")
        if re.fullmatch(r"(\S*/)?ray stop", stripped):
            line = "stop_own_ray"
        lines.append(line)
    return "\n".join(lines)


def test_readme_blocks_are_what_this_test_and_ci_cover():
    readme = (REPO / "README.md").read_text()
    blocks = bash_blocks(readme)
    assert len(blocks) >= 4
    text = "\n".join(blocks)
    assert PYTEST_LINE in text and PYTEST_LINE in (REPO / ".ci" / "run").read_text()
    assert SETUP in (REPO / ".ci" / "run").read_text()
    # the first block finds the shared data with an absolute path, before its command
    first = blocks[0]
    assert first.index('export EXVAE_DATA_DIR="$(cd .. && pwd)/shared/data"') \
        < first.index("-m exvae_dist.train")
    assert "--node-ip-address 127.0.0.1" in text
    job = next(b for b in blocks if "ray job submit" in b)
    assert '"$PWD/.venv/bin/python" -m exvae_dist.train' in job
    # the short form: no train.run_dir, the run goes to $RAY_STORAGE (set below) or ~/exvae_runs
    assert "train.run_dir" not in job
    # a submit before the head's job agent is up fails ("No available agent"), seen in CI
    assert job.index("127.0.0.1:52365/api/healthz") < job.index("ray job submit")
    # one MLflow store (train.run_dir/mlflow.db) for every README run: the one the README's
    # `mlflow ui` command shows
    assert set(re.findall(r"train\.run_dir=(\S+)", text)) <= {'"$PWD/runs"'}, text
    assert "--backend-store-uri sqlite:///runs/mlflow.db" in readme
    quick = next(b for b in blocks if "train.epochs=10 train.warmup_epochs=10" in b
                 and "-m exvae_dist.train " in b)
    assert "train.name=" in quick  # never silently resumes the default run
    # a run shorter than the KL warm-up ends with beta < 1 (a poor model): each README run
    # that sets train.epochs sets a warm-up that fits
    for line in text.replace("\\\n", " ").splitlines():
        epochs = re.search(r"train\.epochs=(\d+)", line)
        if epochs and COMMAND.search(line):
            warmup = re.search(r"train\.warmup_epochs=(\d+)", line)
            assert warmup and int(warmup.group(1)) <= int(epochs.group(1)), line


@pytest.mark.slow
def test_readme_commands_run(data_dir, tmp_path, capsys):
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs the project's venv (.venv) to stand in for the README's")
    pytest.importorskip("psutil")
    repo = tmp_path / "exvae-dist"
    shutil.copytree(REPO, repo, ignore=IGNORED, symlinks=True)
    (repo / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data_dir.resolve())
    ray_tmp = Path(tempfile.mkdtemp(prefix="rdm", dir="/tmp"))  # short: Ray's socket paths
    blocks = [shorten(b) for b in bash_blocks((repo / "README.md").read_text())]
    script = ["set -euo pipefail", f"stop_own_ray() {{ {sys.executable} -c "
              f"'from tests.own_ray import stop_own_ray; from pathlib import Path; "
              f"stop_own_ray(Path(\"{ray_tmp}\"))'; }}"]
    for i, block in enumerate(blocks):
        script += [f'echo "@@ {i} start $(date +%s.%N)"', block, f'echo "@@ {i} end $(date +%s.%N)"']
    env = {k: v for k, v in os.environ.items()
           if k not in ("EXVAE_DATA_DIR", "RAY_ADDRESS", "PYTEST_CURRENT_TEST")}
    # RAY_STORAGE: where the job block's run goes (not this machine's ~/exvae_runs)
    env.update(PYTHONPATH=str(repo), RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0",
               RAY_STORAGE=str(repo / "runs"))
    start = time.monotonic()
    try:
        done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=1500)
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:  # still report how far the blocks got
        rc = "timeout"
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                      for x in (err.stdout, err.stderr))
    finally:
        stop_own_ray(ray_tmp)
        ray_logs = ray_log_tails(ray_tmp)  # why a head node or its agent did not come up
        shutil.rmtree(ray_tmp, ignore_errors=True)
    marks = {(int(i), what): float(t) for i, what, t in re.findall(r"@@ (\d+) (start|end) (\S+)", out)}
    with capsys.disabled():
        print(f"\nREADME blocks ({time.monotonic() - start:.0f} s in all):")
        for i, block in enumerate(blocks):
            first = next((l for l in block.splitlines() if l.strip()), "(comments only)")
            took = (f"{marks[i, 'end'] - marks[i, 'start']:.1f} s" if (i, "end") in marks
                    else "FAILED" if (i, "start") in marks else "not run")
            print(f"  block {i}: {took:>8}  {first[:90]}")
    assert rc == 0, out[-6000:] + ray_logs
    runs = repo / "runs"
    for name in ("mnist_vae_exemplar_rat", "quick_look", "smoke", "smoke_job",
                 "results_gaussian", "results_exemplar"):
        assert (runs / name / "summary.json").is_file(), f"{name}: no summary.json\n{out[-3000:]}"
    for name in ("results_gaussian", "results_exemplar"):
        assert list((runs / name / "eval").glob("*/summary.json"))
    # the README's `exemplars add ... mnist:train:5-9` grew its run trained on digits 0-4
    assert (runs / "digits_0_4" / "exemplar_sets" / "v000002" / "set.json").is_file(), out[-3000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-3000:]
