"""DDP's gradient average through shared memory, for CPU ranks that share one machine.

gloo sends even an all-reduce between two processes of one machine over loopback TCP. For the
paper's MLP (4.5 MB of gradients) at 2 workers x 1 CPU that took 7.6 ms a step on the bench
box; through a buffer both processes map, 3.5 ms (bench/README.md, "Two workers x 1 CPU").
So when every rank of a gloo group can map the same file in /dev/shm, DDP averages through it,
as a comm hook: the update stays DDP's. Otherwise (another machine, no /dev/shm, too little
room in it, NCCL) DDP's own all-reduce runs, unchanged.

Each rank copies a bucket's gradients into its slot, a 1-element gloo all-reduce says that
all slots are filled, and every rank sums the slots in rank order and divides by the world:
every rank computes the same sum from the same bytes, so the ranks' weights stay equal bit for
bit. Two sets of slots alternate between calls, so a rank that is ahead never overwrites a
slot that another rank is still summing: to use a set again it must pass the next call's
all-reduce, which the other rank enters only after its sum.
"""

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

SHM = Path("/dev/shm")


@dataclass
class SharedSlots:
    """The mapped buffer ([2, world, numel], the gradients' dtype) and this rank's place."""

    slots: torch.Tensor
    rank: int
    world: int
    calls: int = 0
    ready: torch.Tensor = field(default_factory=lambda: torch.zeros(1))


def map_shared_slots(numel: int, rank: int, world: int, dtype: torch.dtype = torch.float32,
                     folder: Optional[Path] = None) -> Optional[SharedSlots]:
    """Every rank's view of one new buffer for `numel` gradients of `dtype`, or None on every
    rank when any rank cannot map it (not one machine, no such folder, or too little room:
    /dev/shm is 64 MB in a default Docker container). A collective: every rank calls it.

    The file is unlinked as soon as every rank has mapped it, so nothing is left behind,
    whatever happens to the run later."""
    folder = SHM if folder is None else folder
    width = torch.empty(0, dtype=dtype).element_size()
    head = -(-8 // width)  # elements that hold the 8-byte token
    size = (head + 2 * world * numel) * width
    token = 0
    if rank == 0:
        try:  # any failure here is "no shared buffer", never an exception on one rank only
            st = os.statvfs(folder)
            if st.f_bavail * st.f_frsize >= 2 * size:  # leave room for what else uses it
                token = secrets.randbits(62) + 1
                with open(folder / f"exvae-grads-{token:x}", "xb") as f:
                    f.write(token.to_bytes(8, "little"))
                    f.truncate(size)
        except OSError:
            if token:
                (folder / f"exvae-grads-{token:x}").unlink(missing_ok=True)
            token = 0
    t = torch.tensor([token], dtype=torch.int64)
    dist.broadcast(t, 0)
    token = int(t.item())
    path = folder / f"exvae-grads-{token:x}"
    buffer = None
    if token:
        try:  # the random name and the token inside: this file, not another machine's
            with open(path, "rb") as f:
                if int.from_bytes(f.read(8), "little") == token:
                    buffer = torch.from_file(str(path), shared=True,
                                             size=head + 2 * world * numel, dtype=dtype)
        except (OSError, RuntimeError):  # RuntimeError: torch's mmap failed
            buffer = None
    ok = torch.tensor([int(buffer is not None)], dtype=torch.int64)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0 and token:
        path.unlink(missing_ok=True)  # every rank that could map it has (all_reduce above)
    if not ok.item():
        return None
    return SharedSlots(buffer[head:].view(2, world, numel), rank, world)


def average_through_shared_slots(state: SharedSlots,
                                 bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP comm hook (`register_comm_hook(state, this)`): the bucket's gradients averaged
    over the ranks, in place. (No `from __future__ import annotations` in this module: DDP
    checks this signature's annotations as objects.)"""
    grads = bucket.buffer()
    n = grads.numel()
    slots = state.slots[state.calls % 2]
    state.calls += 1
    slots[state.rank, :n].copy_(grads)
    dist.all_reduce(state.ready)  # every rank's slot is filled
    torch.sum(slots[:, :n], 0, out=grads)
    grads.div_(state.world)
    done = torch.futures.Future()
    done.set_result(grads)
    return done
