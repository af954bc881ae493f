"""What a run ran on: the machine and software of each session of a run, for its records.

A run that is interrupted and resumed may continue on another machine; each start of the
training loop appends one line to <run>/sessions.jsonl, and the run's summary.json gives the
total wall time over all sessions (the sum of the epochs' wall times) next to the machines.
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Optional

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str = "cpu") -> dict:
    """{host, cpu, cores, torch, torch_threads, device, gpu, python}: this process's hardware."""
    gpu: Optional[str] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {"host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": device, "gpu": gpu, "python": platform.python_version()}


def session_record(epoch: int, step: int, device: str) -> dict:
    """One line of sessions.jsonl: when and where the loop (re)started, and from where."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"started_utc": now.isoformat(timespec="seconds"), "from_epoch": epoch,
            "from_step": step, **describe(device)}


def hardware_tags(record: dict) -> dict:
    """The session's hardware as tracker tags (hardware.cpu, ...)."""
    return {f"hardware.{k}": str(v) for k, v in record.items()
            if k not in ("started_utc", "from_epoch", "from_step")}
