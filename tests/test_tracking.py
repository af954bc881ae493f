"""MLflow run lifecycle: end statuses, resume without duplicated steps, the URI probe."""

import socket
import time

import pytest

from exvae_dist.runs.tracking import (FAILED, FINISHED, KILLED, MlflowTracker, NullTracker,
                                      TrackingUnavailableError, open_run_tracker, probe,
                                      status_for)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One sqlite store for the module: creating one runs MLflow's migrations (seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracker(tmp_path, db):
    """tracker(**kw): the run folder tmp_path/run's MlflowTracker (reopened when called again)."""
    return lambda **kw: MlflowTracker(tmp_path / "run", db, "test", **kw)


def history(t, key):
    return sorted(m.step for m in t.client.get_metric_history(t.run_id, key))


def test_resumed_run_is_killed_then_continues_without_duplicated_steps(tracker):
    first = tracker()
    for step in range(1, 11):
        first.log_metrics({"loss": 100.0 - step, "beta": 0.1}, step)
    first.end(KILLED)
    assert first.client.get_run(first.run_id).info.status == KILLED

    # the checkpoint was at step 5: the resumed attempt replays steps 6..10, then goes on
    again = tracker()
    assert again.run_id == first.run_id  # the same MLflow run, reopened
    assert again.client.get_run(again.run_id).info.status == "RUNNING"
    for step in range(6, 13):
        again.log_metrics({"loss": 50.0 - step, "beta": 0.2, "val_elbo": -90.0}, step)
    again.end(FINISHED)
    assert history(again, "loss") == list(range(1, 13))  # each step exactly once
    assert history(again, "beta") == list(range(1, 13))
    assert history(again, "val_elbo") == list(range(6, 13))  # a key new in this attempt
    assert again.client.get_run(again.run_id).info.status == FINISHED


@pytest.mark.parametrize("exc, status", [
    (None, FINISHED), (KeyboardInterrupt(), KILLED), (RuntimeError("boom"), FAILED),
    (SystemExit(130), KILLED), (SystemExit(0), FINISHED), (SystemExit(2), FAILED)])
def test_status_for_how_a_run_ended(exc, status):
    assert status_for(exc) == status


def test_context_manager_marks_ctrl_c_killed_and_errors_failed(tracker):
    with pytest.raises(KeyboardInterrupt):
        with tracker() as t:
            t.log_metrics({"loss": 1.0}, 1)
            raise KeyboardInterrupt
    assert t.client.get_run(t.run_id).info.status == KILLED
    with pytest.raises(ValueError):
        with tracker() as t:  # reopened: the same run, now failed
            raise ValueError("bad batch")
    assert t.client.get_run(t.run_id).info.status == FAILED
    with NullTracker() as null:  # the stand-in accepts the same protocol
        null.log_metrics({"loss": 1.0}, 1)


def test_evaluate_reopens_without_changing_the_status(tmp_path, tracker):
    t = tracker()
    t.end(KILLED)
    later = open_run_tracker(tmp_path / "run")
    later.log_metrics({"test_elbo": -90.0}, 3)
    later.end()
    assert later.run_id == t.run_id
    assert t.client.get_run(t.run_id).info.status == KILLED
    assert history(t, "test_elbo") == [3]


def test_system_metrics_are_logged(tracker, monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    t = tracker(system_metrics=True)
    deadline = time.time() + 20
    while time.time() < deadline and not any(
            k.startswith("system/") for k in t.client.get_run(t.run_id).data.metrics):
        time.sleep(0.2)
    t.end()
    keys = t.client.get_run(t.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in keys, sorted(keys)


def test_probe_fails_fast_on_a_dead_server():
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=rf"tracking.uri=http://127.0.0.1:{port}"):
        probe(f"http://127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - start < 30  # not MLflow's minutes of retries
    probe(None)
    probe("sqlite:///somewhere/mlflow.db")  # local stores need no probe


def test_probe_accepts_a_server_that_answers():
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        probe(f"http://127.0.0.1:{server.server_port}", timeout_s=5)
    finally:
        server.shutdown()
        server.server_close()


RACE = """
import sys, time
from pathlib import Path
from exvae_dist.runs.tracking import MlflowTracker
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # start together
t = MlflowTracker(Path(sys.argv[1]), sys.argv[2], "race")
print(t.run_id)
"""


def test_runs_starting_together_on_a_new_store_all_get_a_run(tmp_path):
    """Seen failing without store_lock: a second process died in MLflow's schema migration."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = time.time() + 8.0  # after every interpreter has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / f"run{i}"), uri,
                               str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    run_ids = {out.strip() for out, _ in outs}
    assert len(run_ids) == 3
    t = MlflowTracker(tmp_path / "run0", uri, "race")
    assert len(t.client.search_runs([t.client.get_experiment_by_name("race").experiment_id])) == 3


class LockedStore:
    """A client whose store is locked for the first `locked` status writes."""

    def __init__(self, client, locked):
        self.client, self.locked, self.calls = client, locked, 0

    def set_terminated(self, run_id, status):
        self.calls += 1
        if self.calls <= self.locked:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        self.client.set_terminated(run_id, status=status)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_a_locked_store_is_waited_out_and_never_replaces_a_ctrl_c(tracker, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    t = tracker()
    real = t.client
    t.client = LockedStore(real, locked=2)  # locked for a moment: the status still lands
    t.end(FINISHED)
    assert t.client.calls == 3 and real.get_run(t.run_id).info.status == FINISHED
    t = tracker()
    t.client = LockedStore(real, locked=99)  # locked for good, after Ctrl-C
    assert t.end_for(KeyboardInterrupt()) == KILLED  # a warning, not a new exception
    t = tracker()
    t.client = LockedStore(real, locked=99)
    with pytest.raises(RuntimeError, match="database is locked"):
        t.end_for(None)  # a normal end still reports that its status was not written


def test_a_full_mlflow_store_is_a_clear_error_that_ray_does_not_retry(tracker, monkeypatch):
    """sqlite's "database or disk is full" becomes a TrackingWriteError naming the store and
    the way on, which the Ray trainer's failure policy raises at once (no retry), and the
    driver raises as the worker's own error."""
    from mlflow.exceptions import MlflowException
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from exvae_dist.runs.tracking import TrackingWriteError
    from exvae_dist.train.failures import StopOnKnownError

    t = tracker()

    def full(*args, **kwargs):
        raise MlflowException("(sqlite3.OperationalError) database or disk is full")

    monkeypatch.setattr(t.client, "log_batch", full)
    with pytest.raises(TrackingWriteError, match=f"the MLflow store {t.uri} cannot be "
                                                 "written, its disk is full .* MiB free"):
        t.log_metrics({"loss": 1.0}, 1)
    monkeypatch.setattr(t.client, "log_batch", lambda *a, **k: (_ for _ in ()).throw(
        MlflowException("some other problem")))
    with pytest.raises(MlflowException, match="some other problem"):
        t.log_metrics({"loss": 1.0}, 2)
    t.end()

    # on Ray: a full store ends the run (the controller's callback raises it: not retried);
    # another worker error is left to Ray Train's retries
    full_error = TrackingWriteError(28, "full")
    stop = StopOnKnownError()
    with pytest.raises(TrackingWriteError):
        stop.after_exception(None, {0: UserExceptionWithTraceback(full_error, "tb")})
    stop.after_exception(None, {0: UserExceptionWithTraceback(OSError(5), "tb")})  # no raise
    wrapped = WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(full_error, "tb")})
    from exvae_dist.common.errors import find_known

    assert find_known(wrapped) is full_error
