"""DDP's gradient average through shared memory, for CPU ranks that share one machine.

gloo sends even an all-reduce between two processes of one machine over loopback TCP: for the
paper's MLP (4.5 MB of gradients) at 2 workers x 1 CPU the step ran at 0.79 of one 2-thread
process with it, at 0.84 through a buffer both processes map (bench/README.md, "Two workers
x 1 CPU"). So when every rank of a gloo group can map the same file in /dev/shm, DDP averages
through it, as a comm hook: the update stays DDP's. Otherwise (another machine, no /dev/shm,
too little room in it, parameters of several dtypes, NCCL) DDP's own all-reduce runs.

Every rank reads all the slots, so the work per rank grows with the world: this is for the
few CPU workers of one machine, as measured at 2.

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

from .group import Group

SHM = Path("/dev/shm")


@dataclass
class SharedSlots:
    """The mapped buffer ([2, world, numel], the gradients' dtype) and this rank's place."""

    slots: torch.Tensor
    rank: int
    world: int
    calls: int = 0
    ready: torch.Tensor = field(default_factory=lambda: torch.zeros(1))


def map_shared_slots(numel: int, group: Group, dtype: torch.dtype = torch.float32,
                     folder: Optional[Path] = None) -> Optional[SharedSlots]:
    """Every rank's view of one new buffer for `numel` gradients of `dtype`, or None on every
    rank when any rank cannot map it (not one machine, no such folder, or too little room:
    /dev/shm is 64 MB in a default Docker container). A collective: every rank calls it.

    The file is readable by this user only, its pages are reserved up front (a full /dev/shm
    would otherwise kill a rank with SIGBUS at its first write), and it is unlinked as soon
    as every rank has mapped it: only a rank killed inside this call leaves it behind."""
    folder = SHM if folder is None else folder
    rank, world = group.rank, group.world
    width = torch.empty(0, dtype=dtype).element_size()
    head = -(-8 // width)  # elements that hold the 8-byte token
    size = (head + 2 * world * numel) * width
    token = 0
    if rank == 0:
        created = None
        try:  # any failure here is "no shared buffer", never an exception on one rank only
            st = os.statvfs(folder)
            if st.f_bavail * st.f_frsize >= 2 * size:  # leave room for what else uses it
                token = secrets.randbits(62) + 1
                path = folder / f"exvae-grads-{token:x}"
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                created = path
                with os.fdopen(fd, "wb") as f:
                    os.posix_fallocate(f.fileno(), 0, size)
                    f.write(token.to_bytes(8, "little"))
        except OSError:
            if created is not None:
                created.unlink(missing_ok=True)
            token = 0
    token = group.broadcast_int(token)
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
    mapped = group.sum([buffer is not None])[0]
    if rank == 0 and token:
        path.unlink(missing_ok=True)  # every rank that could map it has (the sum above)
    if mapped < world:
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
