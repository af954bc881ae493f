"""The process group of the training loop: the few torch.distributed collectives it needs,
and no-ops without a process group (the one-process trainer: world of one rank).

Ray Train sets up the process group (gloo on CPU, NCCL on GPU) before the worker loop starts;
a test can set up a 1-rank gloo group in-process. Without any process group every helper
acts as the world of one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process's place in the worker group and the device collectives run on."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def current(cls, device: torch.device = torch.device("cpu")) -> "Group":
        if dist.is_available() and dist.is_initialized():
            # NCCL reduces tensors on the GPU only; gloo on the CPU.
            coll = device if dist.get_backend() == "nccl" else torch.device("cpu")
            return cls(dist.get_rank(), dist.get_world_size(), coll)
        return cls()

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_int(self, value: int, src: int = 0) -> int:
        """Rank src's value on every rank."""
        if not self.active:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src)
        return int(t.item())

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a short list of floats (float64 on the wire)."""
        if not self.active or self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()
