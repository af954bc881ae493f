"""MLflow tracking: one MLflow run per training run, written by rank 0 only.

Uses `MlflowClient` (no global active run), so a trainer, an evaluator and a Ray worker can
each hold their own tracker. The MLflow run id is remembered in `<run dir>/mlflow_run.json`
so a resumed training run, `evaluate` and `augment` log into the same MLflow run.

Default store: `sqlite:///<run_dir>/mlflow.db` with artifacts under `<run_dir>/mlartifacts`
(MLflow 3 refuses the plain file store unless told otherwise).

Lifecycle (what the training loop calls):

    probe(cfg.tracking.uri)                      # entry point, before Ray or data: fail fast
    with make_tracker(cfg, run_path) as tracker:  # FINISHED / KILLED (Ctrl-C) / FAILED
        tracker.log_metrics({...}, step)

On resume the run is reopened and every metric key skips the steps it already holds: MLflow
cannot delete metric points. The training loop sends a step's metrics only once a checkpoint
covers it (loop.MetricsLog.commit), so the steps a resume trains again (not the same
computation with asynchronous refresh) were never logged, and MLflow holds what
metrics.jsonl holds, each step once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import shutil
import logging
import math
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from ..common.jsonio import read_json, write_json
from ..common.errors import KnownError

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
FINISHED, KILLED, FAILED = "FINISHED", "KILLED", "FAILED"


class TrackingUnavailableError(ConfigError):
    """tracking.uri names a server that does not answer (checked before any work starts)."""


class TrackingWriteError(KnownError, OSError):
    """The MLflow store is full ("database or disk is full"): a retry meets it again, so the
    Ray trainer does not retry it (driver.NOT_RETRIED); the message names the store, the free
    space and the way on."""


def full_store_error(uri: str, err: BaseException) -> Optional[TrackingWriteError]:
    """A TrackingWriteError for an MLflow write that failed on a full disk, else None."""
    text = str(err)
    full = ("disk is full" in text or "No space left" in text
            or getattr(err, "errno", None) == errno.ENOSPC)
    if not full:
        return None
    folder = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else None
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free on {folder}; " \
            if folder else ""
    except OSError:
        free = ""
    return TrackingWriteError(
        errno.ENOSPC, f"the MLflow store {uri} cannot be written, its disk is full ({free}"
        f"{type(err).__name__}: {text.splitlines()[0] if text else ''}). metrics.jsonl and "
        f"the checkpoints hold the run: free space (or set tracking.uri to another store) "
        f"and rerun the same command; the resume sends MLflow the steps it lacks")


def default_uri(run_root: Path) -> str:
    return f"sqlite:///{(run_root / 'mlflow.db').resolve()}"


@contextlib.contextmanager
def store_lock(uri: str):
    """Holds `<db>.lock` (flock) for a local sqlite store, a no-op for any other store. Two
    runs starting at once on a new store both ran MLflow's schema migration, and one died in
    alembic ("expected to match one row"); likewise both could create the experiment."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri[len("sqlite:///"):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def create_store(uri: str, run_root: Path) -> None:
    """Creates a new local sqlite store with its "Default" experiment's artifact root in
    <run_root>/mlartifacts, as our own experiment's: MLflow would otherwise root it at
    ./mlruns of the current folder, a temporary one in a Ray worker. Call under store_lock."""
    if not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, (run_root / "mlartifacts").resolve().as_uri())


def status_for(exc: Optional[BaseException]) -> str:
    """The MLflow run status for how a run ended: no exception FINISHED, Ctrl-C (or a
    SIGTERM turned into KeyboardInterrupt / SystemExit 130) KILLED, anything else FAILED."""
    if exc is None:
        return FINISHED
    if isinstance(exc, KeyboardInterrupt):
        return KILLED
    if isinstance(exc, SystemExit):
        return FINISHED if exc.code in (0, None) else KILLED if exc.code in (130, 143) else FAILED
    return FAILED


def probe(uri: Optional[str], timeout_s: float = 5.0) -> None:
    """Fails within `timeout_s` when `uri` is an HTTP(S) tracking server that does not answer.

    MLflow's own client retries a dead server with backoff for minutes (251 s were seen for
    http://127.0.0.1:1), after Ray and the data have started; entry points call this first.
    Local stores (None, sqlite:, file:) need no probe.
    """
    if not uri or not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"  # the MLflow tracking server's liveness endpoint
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            if reply.status < 500:
                return
            problem = f"HTTP {reply.status}"
    except urllib.error.HTTPError as err:
        if err.code < 500:  # answering, e.g. a proxy without /health: the server is up
            return
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise TrackingUnavailableError(
        f"tracking.uri={uri} does not answer ({problem}, probed {url} with a {timeout_s:g} s "
        f"timeout): start the MLflow server (e.g. `mlflow server --host 127.0.0.1 --port 5000`), "
        f"fix tracking.uri, leave it unset for the run folder's sqlite store, or set "
        f"tracking.enabled=false")


class NullTracker:
    """Stands in on ranks other than 0 and when tracking is off: every call does nothing.

    Also a context manager: `with tracker:` ends the run with `status_for` the exception.
    """

    run_id: Optional[str] = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path, artifact_path: Optional[str] = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def end(self, status: str = FINISHED) -> None: ...

    def end_for(self, exc: Optional[BaseException]) -> str:
        """Ends the run with the status that `exc` (None = normal end) calls for; returns it.
        After an exception (Ctrl-C, a failure) a status that cannot be written is a warning:
        it must not replace the exception, and with it the exit code, the caller is handling."""
        status = status_for(exc)
        if exc is None:
            self.end(status)
            return status
        try:
            self.end(status)
        except Exception as err:
            log.warning("could not mark the MLflow run %s (%s); the run folder and its "
                        "checkpoints are intact", status, err)
        return status

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.end_for(exc)
        return False  # never swallows the exception


class MlflowTracker(NullTracker):
    """One MLflow run bound to a run directory; reopened (not duplicated) on resume.

    owner=True (the trainers): the run is marked RUNNING while this tracker lives and gets
    its end status from `end`; system metrics (CPU, memory, disk, network, GPU; `system/*`)
    are sampled every 10 s when `system_metrics` (the trainers: always; needs psutil).
    owner=False (evaluate, augment): logs into the run and leaves its status as it was.
    """

    def __init__(self, run_path: Path, uri: Optional[str], experiment: str,
                 run_name: Optional[str] = None, owner: bool = True,
                 system_metrics: bool = False):
        from mlflow.tracking import MlflowClient

        self.run_path = Path(run_path)
        self.run_path.mkdir(parents=True, exist_ok=True)
        self.owner = owner
        self._ended = False
        self._monitor = None
        saved = self._saved()
        self.uri = uri or (saved or {}).get("uri") or default_uri(self.run_path.parent)
        resumed = bool(saved and saved.get("uri") == self.uri)
        with store_lock(self.uri):  # the first client of a new store creates (migrates) it
            create_store(self.uri, self.run_path.parent)
            self.client = MlflowClient(tracking_uri=self.uri)
            if resumed:
                self.run_id = saved["run_id"]
                if owner:
                    self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = self._new_run(experiment, run_name)
        # the largest step each metric key already holds (MLflow keeps, per key, the value
        # at the largest step as the run's latest metric: one query, not the histories)
        self._last_step = self._logged_steps() if resumed else {}
        if owner and system_metrics:
            self._start_system_metrics(resumed)

    def _new_run(self, experiment: str, run_name: Optional[str]) -> str:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifacts = (self.run_path.parent / "mlartifacts").resolve()
            exp_id = self.client.create_experiment(experiment,
                                                   artifact_location=artifacts.as_uri())
        else:
            exp_id = exp.experiment_id
        run_id = self.client.create_run(exp_id, run_name=run_name or self.run_path.name).info.run_id
        write_json(self.run_path / RUN_FILE, {"uri": self.uri, "run_id": run_id})
        return run_id

    def _saved(self) -> Optional[dict]:
        path = self.run_path / RUN_FILE
        if not path.is_file():
            return None
        try:
            return read_json(path)
        except ValueError:
            log.warning("%s is unreadable; starting a new MLflow run", path)
            return None

    def _logged_steps(self) -> dict[str, int]:
        data = self.client.get_run(self.run_id).data
        metrics = getattr(data, "_metric_objs", None)
        if metrics is not None:
            return {m.key: int(m.step) for m in metrics}
        # fallback for an MLflow without _metric_objs: the histories, once
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                for key in data.metrics}

    def _start_system_metrics(self, resumed: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as err:  # psutil missing: training goes on without them
            log.warning("MLflow system metrics are off (%s); pip install psutil", err)
            return
        # resume_logging: system/* steps continue after the last one logged
        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed,
                                             tracking_uri=self.uri)
        self._monitor.start()

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self._write(self.client.log_batch, self.run_id, params=fresh[i:i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Logs the finite numbers of `metrics` at `step`, skipping keys that already hold
        this step or a later one (a resumed run replaying steps an aborted attempt logged)."""
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(step)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 and step > self._last_step.get(k, -1)]
        if batch:
            self._write(self.client.log_batch, self.run_id, metrics=batch)
            self._last_step.update({m.key: step for m in batch})

    def log_artifact(self, path, artifact_path: Optional[str] = None) -> None:
        self._write(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def _write(self, call, *args, **kwargs):
        """call(*args, **kwargs), a full disk raised as TrackingWriteError."""
        try:
            return call(*args, **kwargs)
        except Exception as err:
            full = full_store_error(self.uri, err)
            if full is None:
                raise
            raise full from err

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def end(self, status: str = FINISHED) -> None:
        """Stops system metrics and, for the owner, marks the run `status`; once."""
        if self._ended:
            return
        self._ended = True
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as err:  # metrics are best effort; the status must be written
                log.warning("stopping MLflow system metrics failed: %s", err)
        if self.owner:
            self._set_terminated(status)

    def _set_terminated(self, status: str, attempts: int = 6) -> None:
        # a sqlite store is locked while another writer (the system-metrics thread, another
        # run on the same store) commits: transient, so waited out (0.5 s doubling, ~15 s)
        for attempt in range(attempts):
            try:
                self.client.set_terminated(self.run_id, status=status)
                return
            except Exception as err:
                if "database is locked" not in str(err) or attempt == attempts - 1:
                    raise
                time.sleep(0.5 * 2 ** attempt)


def make_tracker(cfg, run_path: Path, rank: int = 0) -> NullTracker:
    """The run's tracker on rank 0 when tracking is enabled, a NullTracker otherwise."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    return MlflowTracker(run_path, cfg.tracking.uri, cfg.tracking.experiment, cfg.run_name(),
                         system_metrics=True)  # off only where psutil is missing


def end_run_of(run_path: Path, exc: Optional[BaseException]) -> None:
    """Marks the MLflow run of a run folder as `exc` calls for (status_for), with an end time:
    the Ray driver's part when its workers were stopped from outside (Ctrl-C aborts them
    before their tracker can). Nothing when the folder has no MLflow run; a status that
    cannot be written is a warning (tracker.end_for)."""
    if not (Path(run_path) / RUN_FILE).is_file():
        return
    try:
        tracker = open_run_tracker(run_path)
    except Exception as err:
        log.warning("could not open the MLflow run of %s to mark it %s (%s)", run_path,
                    status_for(exc), err)
        return
    tracker.owner = True  # this call is the run's end
    tracker.end_for(exc)


def open_run_tracker(run_path: Path) -> NullTracker:
    """Reopens the MLflow run a training run created (evaluate, augment) without changing its
    status; NullTracker if there is none."""
    saved = Path(run_path) / RUN_FILE
    if not saved.is_file():
        return NullTracker()
    info = read_json(saved)
    return MlflowTracker(Path(run_path), info["uri"], experiment="exvae-dist", owner=False)
