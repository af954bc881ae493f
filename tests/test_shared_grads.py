"""DDP's average through shared memory (core/shared_grads.py), in real gloo groups of 2 and 3
processes, against the average written out: mean over ranks of each rank's own gradients."""

import copy
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from exvae_dist.core import shared_grads
from exvae_dist.core.group import Group
from exvae_dist.core.shared_grads import map_shared_slots
from exvae_dist.train.worker import wrap

STEPS = 3


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    # float64, so that the formula below (the parent's own matrix products) agrees with the
    # ranks' to 1e-12 whatever the thread counts; 1.4 MB of gradients, more than DDP's
    # default first bucket (1 MB), so that one hook call a step says wrap asked for one bucket
    return torch.nn.Sequential(torch.nn.Linear(30, 400), torch.nn.Tanh(),
                               torch.nn.Linear(400, 400), torch.nn.Tanh(),
                               torch.nn.Linear(400, 5)).double()


def data(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return (torch.randn(8, 30, generator=g, dtype=torch.float64),
            torch.randn(8, 5, generator=g, dtype=torch.float64))


def loss(net, x, y):
    return ((net(x) - y) ** 2).sum()


def _child(job, rank: int, world: int, folder: str, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank,
                            world_size=world)
    try:
        queue.put((rank, job(rank, world, Path(folder))))
    except BaseException:  # the parent fails with it instead of waiting on the queue
        queue.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_group(job, world: int, folder: Path) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(job, r, world, str(folder), queue))
             for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(world):
        rank, result = queue.get(timeout=120)
        assert not isinstance(result, str), result
        got[rank] = result
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return got


def _train(rank: int, world: int, folder: Path) -> dict:
    shared_grads.SHM = folder / "shm"  # not the machine's /dev/shm
    net = model()
    ddp = wrap(net, Group.current(), torch.device("cpu"))
    found = sorted(os.listdir(shared_grads.SHM))
    gloo = DistributedDataParallel(copy.deepcopy(net))  # DDP's own all-reduce
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, gloo.module)]
    out = {"found": found, "hooks": [type(s).__name__ for _, s in ddp._comm_hooks],
           "grads": [], "params": [], "gloo_params": []}
    for step in range(STEPS):
        x, y = data(rank, step)
        for m, opt in ((ddp, opts[0]), (gloo, opts[1])):
            opt.zero_grad()
            loss(m, x, y).backward()
            opt.step()
        # as numpy: a tensor on the queue would be shared by a file descriptor that dies
        # with this process
        out["grads"].append([p.grad.numpy().copy() for p in net.parameters()])
        out["params"].append([p.detach().numpy().copy() for p in net.parameters()])
        out["gloo_params"].append([p.detach().numpy().copy() for p in gloo.module.parameters()])
    out["calls"] = ddp._comm_hooks[0][1].calls
    del ddp, gloo
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_averages_through_shared_memory_as_the_formula_says(tmp_path, world):
    (tmp_path / "shm").mkdir()
    got = run_group(_train, world, tmp_path)
    for rank in range(world):
        assert got[rank]["hooks"] == ["SharedSlots"]
        assert got[rank]["calls"] == STEPS  # one bucket: one wait for the others a step
        assert got[rank]["found"] == []  # unlinked once every rank had it mapped
    # the same weights on every rank, bit for bit
    for rank in range(1, world):
        for a, b in zip(got[0]["params"], got[rank]["params"]):
            assert all(np.array_equal(p, q) for p, q in zip(a, b))
    # each step's gradient is the mean of the ranks' own gradients at the same weights
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(STEPS):
        own = []
        for rank in range(world):
            net.zero_grad()
            loss(net, *data(rank, step)).backward()
            own.append([p.grad.clone() for p in net.parameters()])
        for i, p in enumerate(net.parameters()):
            p.grad = sum(g[i] for g in own) / world
            torch.testing.assert_close(torch.from_numpy(got[0]["grads"][step][i]), p.grad,
                                       rtol=1e-12, atol=1e-12)
        opt.step()
        # and the weights follow DDP's own all-reduce's: to rounding, and at 2 ranks
        # exactly (halving is exact, and a + b = b + a)
        for ours, gloo in zip(got[0]["params"][step], got[0]["gloo_params"][step]):
            if world == 2:
                assert np.array_equal(ours, gloo)
            np.testing.assert_allclose(ours, gloo, rtol=1e-12, atol=1e-12)


def _cannot_share(rank: int, world: int, folder: Path) -> list:
    # each rank looks in a folder of its own: as if on two machines
    mine = folder / f"shm{rank}"
    mine.mkdir()
    group = Group.current()
    apart = map_shared_slots(10, group, folder=mine)
    missing = map_shared_slots(10, group, folder=folder / "absent")

    def no_room(*_):
        raise OSError(28, "No space left on device")

    os.posix_fallocate = no_room  # reserving the buffer's pages fails on rank 0, halfway
    full = map_shared_slots(10, group, folder=folder / "shm")
    shared_grads.SHM = folder / "absent"
    ddp = wrap(model(), Group.current(), torch.device("cpu"))
    return [apart is None, missing is None, full is None, sorted(os.listdir(mine)),
            sorted(os.listdir(folder / "shm")), type(ddp).__name__, len(ddp._comm_hooks)]


def test_ranks_that_cannot_share_a_file_keep_gloo(tmp_path):
    (tmp_path / "shm").mkdir()
    got = run_group(_cannot_share, 2, tmp_path)
    expected = [True, True, True, [], [], "DistributedDataParallel", 0]
    assert got[0] == expected and got[1] == expected
