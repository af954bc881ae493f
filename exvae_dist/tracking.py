"""MLflow tracking: one MLflow run per training run, written by rank 0 only.

Uses `MlflowClient` (no global active run), so a trainer, an evaluator and a Ray worker can
each hold their own tracker. The MLflow run id is remembered in `<run dir>/mlflow_run.json`
so a resumed training run, `evaluate` and `augment` log into the same MLflow run.

Default store: `sqlite:///<run_dir>/mlflow.db` with artifacts under `<run_dir>/mlartifacts`
(MLflow 3 refuses the plain file store unless told otherwise).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"


def default_uri(run_root: Path) -> str:
    return f"sqlite:///{(run_root / 'mlflow.db').resolve()}"


class NullTracker:
    """Stands in on ranks other than 0 and when tracking is off: every call does nothing."""

    run_id: Optional[str] = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path, artifact_path: Optional[str] = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run bound to a run directory; reopened (not duplicated) on resume."""

    def __init__(self, run_path: Path, uri: Optional[str], experiment: str,
                 run_name: Optional[str] = None):
        from mlflow.tracking import MlflowClient

        self.run_path = Path(run_path)
        self.run_path.mkdir(parents=True, exist_ok=True)
        saved = self._saved()
        self.uri = uri or (saved or {}).get("uri") or default_uri(self.run_path.parent)
        self.client = MlflowClient(tracking_uri=self.uri)
        if saved and saved.get("uri") == self.uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifacts = (self.run_path.parent / "mlartifacts").resolve()
            exp_id = self.client.create_experiment(experiment, artifact_location=artifacts.as_uri())
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=run_name or self.run_path.name)
        self.run_id = run.info.run_id
        tmp = self.run_path / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps({"uri": self.uri, "run_id": self.run_id}))
        os.replace(tmp, self.run_path / RUN_FILE)

    def _saved(self) -> Optional[dict]:
        path = self.run_path / RUN_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            log.warning("%s is unreadable; starting a new MLflow run", path)
            return None

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def make_tracker(cfg, run_path: Path, rank: int = 0) -> NullTracker:
    """The run's tracker on rank 0 when tracking is enabled, a NullTracker otherwise."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    return MlflowTracker(run_path, cfg.tracking.uri, cfg.tracking.experiment, cfg.run_name())


def open_run_tracker(run_path: Path) -> NullTracker:
    """Reopens the MLflow run a training run created (evaluate, augment); NullTracker if none."""
    saved = Path(run_path) / RUN_FILE
    if not saved.is_file():
        return NullTracker()
    info = json.loads(saved.read_text())
    return MlflowTracker(Path(run_path), info["uri"], experiment="exvae-dist")


def flat_params(cfg_dict: dict) -> dict[str, Any]:
    from .config import flatten

    return flatten(cfg_dict)
