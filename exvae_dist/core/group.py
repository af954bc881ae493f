"""The process group of the training loop: the few torch.distributed collectives it needs,
and no-ops without a process group (the one-process trainer: world of one rank).

Ray Train sets up the process group (gloo on CPU, NCCL on GPU) before the worker loop starts;
a test can set up a 1-rank gloo group in-process. Without any process group every helper
acts as the world of one rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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

    def share(self, n: int, rank: Optional[int] = None) -> tuple[int, int]:
        """Rows [start, stop) of n that `rank` (default: this one) takes when work over n
        rows is split evenly among the ranks."""
        rank = self.rank if rank is None else rank
        return rank * n // self.world, (rank + 1) * n // self.world

    def gather_rows(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's share (`share(n)`) of an [n, ...] tensor -> the whole of it on every
        rank, on part's device (one all_gather of equal, padded blocks)."""
        if not self.active or self.world == 1:
            return part
        width = -(-n // self.world)
        block = part.new_zeros((width, *part.shape[1:]), device=self.device)
        block[:part.shape[0]] = part.to(self.device)
        blocks = [torch.empty_like(block) for _ in range(self.world)]
        dist.all_gather(blocks, block)
        sizes = [stop - start for start, stop in (self.share(n, r) for r in range(self.world))]
        return torch.cat([b[:size] for b, size in zip(blocks, sizes)]).to(part.device)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a short list of floats (float64 on the wire)."""
        if not self.active or self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()
