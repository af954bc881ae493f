"""What a training run records, on rank 0: metrics.jsonl, sessions.jsonl, sample grids, the
curves, summary.json and the MLflow run (through the tracker). The training loop is handed a
recorder, as it is handed a checkpoint sink, so the loop itself writes no file and imports
no plotting or tracking library; other ranks get a NullRecorder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .. import config as config_mod
from . import hardware
from ..common import jsonio
from .checkpoint import BEST
from ..core.sampling import sample_images

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
# one line per start of the loop: when, from which epoch, on what machine (hardware.py)
SESSIONS = "sessions.jsonl"


class MetricsLog:
    """metrics.jsonl in the run directory: one JSON object per logged step or epoch.

    With a tracker, each record also goes to the tracker, but only at the next `commit`
    (called after each checkpoint): a step past the last checkpoint is trained again on
    resume, and with asynchronous refreshes the replay is not the same computation, so the
    tracker (which cannot delete a point) only ever sees steps no resume will replay.
    `sync` sends what a killed attempt checkpointed but did not commit."""

    def __init__(self, path: Path, tracker=None):
        self.path = path
        self.tracker = tracker
        self.pending: list[dict] = []

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(jsonio.dumps(record, indent=None) + "\n")
        if self.tracker is not None:
            self.pending.append(record)

    def commit(self) -> None:
        """Sends the records written since the last commit to the tracker."""
        for record in self.pending:
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"},
                                     record["step"])
        self.pending = []

    def sync(self) -> None:
        """Sends the file's records to the tracker (after `rewind`, at a start): it skips
        the steps it holds, so only what an attempt checkpointed but never committed goes."""
        if self.tracker is None or not self.path.is_file():
            return
        for line in self.path.read_text().splitlines():
            try:
                self.pending.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        self.commit()

    def rewind(self, step: int) -> int:
        """Drops the records after `step` (written by an attempt that died after the
        checkpoint a resumed run restarts from: those steps are trained again, and would
        otherwise appear twice). Returns how many records were dropped."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the crash
                continue
            if record.get("step", 0) <= step:
                keep.append(line)
        if len(keep) < len(lines):
            jsonio.write_text_atomic(self.path, "".join(line + "\n" for line in keep))
        return len(lines) - len(keep)


class NullRecorder:
    """The recorder of ranks other than 0: records nothing."""

    def begin(self, cfg, epoch: int, step: int, tags: dict) -> list[float]:
        return []

    def step(self, record: dict) -> None: ...

    def epoch(self, summary: dict, model, centres, image_shape) -> None: ...

    def commit(self) -> None: ...

    def finish(self, summary: dict, stopped_early: bool, out_of_time: bool) -> dict:
        return summary

    def failed(self, exc: BaseException) -> None: ...


class RunRecorder(NullRecorder):
    """Rank 0's recorder of the run folder `run`, with `tracker` (tracking.py) for MLflow."""

    def __init__(self, run: Path, tracker, sample_grid: bool = True):
        self.run, self.tracker, self.sample_grid = run, tracker, sample_grid
        self.metrics = MetricsLog(run / METRICS, tracker)

    def begin(self, cfg, epoch: int, step: int, tags: dict) -> list[float]:
        """A (re)start at `step`: drops a dead attempt's later records, logs the params and
        where this session runs; returns the wall time of each epoch so far (time budget)."""
        dropped = self.metrics.rewind(step)
        if dropped:
            log.info("dropped %d metrics records after step %d (an attempt that did not reach "
                     "its next checkpoint)", dropped, step)
        self.metrics.sync()
        self.tracker.log_params(config_mod.flatten(config_mod.to_dict(cfg)))
        session = hardware.session_record(epoch, step, cfg.train.device)
        with open(self.run / SESSIONS, "a") as f:
            f.write(json.dumps(session) + "\n")
        self.tracker.set_tags({**hardware.hardware_tags(session), **(tags or {})})
        return epoch_walls(self.run)

    def step(self, record: dict) -> None:
        self.metrics.write(record)  # to the tracker after the next checkpoint

    def commit(self) -> None:
        """After a checkpoint: the records it covers go to the tracker."""
        self.metrics.commit()

    def epoch(self, summary: dict, model, centres, image_shape) -> None:
        """The epoch's summary, a grid of 100 prior samples and the curves so far."""
        from .curves import plot_curves
        from .figures import save_grid

        self.metrics.write(summary)  # to the tracker after the epoch's checkpoint
        epoch = summary["epoch"]
        if self.sample_grid:
            images = sample_images(model, 100, centres,
                                   generator=torch.Generator().manual_seed(epoch))
            grid = save_grid(images, self.run / "samples" / f"epoch_{epoch:04d}.png",
                             image_shape, title=f"{model.prior_kind} prior, epoch {epoch}")
            self.tracker.log_artifact(grid, "samples")
        self.tracker.log_artifact(plot_curves([self.run], self.run / "curves.png"), "curves")

    def finish(self, summary: dict, stopped_early: bool, out_of_time: bool) -> dict:
        """summary.json (atomically; a rerun of a finished run keeps the summary it had),
        the final config and best checkpoint to the tracker, and the run ended FINISHED."""
        if not summary and (self.run / "summary.json").is_file():  # rerun of a finished run
            summary = json.loads((self.run / "summary.json").read_text())
        summary = jsonio.strict({**summary, "stopped_early": stopped_early,
                                 "stopped_by_time_budget": out_of_time,
                                 **run_time(self.run)})
        jsonio.write_json(self.run / "summary.json", summary)
        if (self.run / "config.yaml").is_file():
            self.tracker.log_artifact(self.run / "config.yaml")
        if (self.run / BEST).is_file():
            self.tracker.log_artifact(self.run / BEST, "checkpoints")
        self.tracker.end()
        return summary

    def failed(self, exc: BaseException) -> None:
        self.tracker.end_for(exc)  # Ctrl-C: KILLED; anything else: FAILED


def epoch_walls(run: Path) -> list[float]:
    """The wall time of each epoch metrics.jsonl records, in order (every session)."""
    walls = []
    if (run / METRICS).is_file():
        for line in (run / METRICS).read_text().splitlines():
            try:
                seconds = json.loads(line).get("epoch_seconds")
            except json.JSONDecodeError:
                continue
            if seconds is not None:
                walls.append(float(seconds))
    return walls


def run_time(run: Path) -> dict:
    """wall_seconds: the sum of the epochs' wall times in metrics.jsonl (every session of the
    run, none counted twice: rewind drops a dead attempt's records); sessions: how many starts
    sessions.jsonl records, and the distinct machines (host, CPU, GPU, torch threads)."""
    wall = sum(epoch_walls(run))
    machines, starts = [], 0
    if (run / SESSIONS).is_file():
        for line in (run / SESSIONS).read_text().splitlines():
            s = json.loads(line)
            starts += 1
            machine = {k: s.get(k) for k in ("host", "cpu", "cores", "gpu", "torch_threads")}
            if machine not in machines:
                machines.append(machine)
    return {"wall_seconds": wall, "wall_hours": wall / 3600, "sessions": starts,
            "machines": machines}


def make_recorder(run: Path, tracker, rank: int, sample_grid: bool) -> NullRecorder:
    return RunRecorder(run, tracker, sample_grid) if rank == 0 else NullRecorder()
