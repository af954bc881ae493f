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

from exvae_dist.core.group import Group
from exvae_dist.core import shared_grads
from exvae_dist.core.shared_grads import map_shared_slots
from exvae_dist.train.worker import wrap


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    # float64, so that the formula below (the parent's own matrix products) agrees with the
    # ranks' to 1e-12 whatever the thread counts
    return torch.nn.Sequential(torch.nn.Linear(30, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 5)).double()


def data(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return (torch.randn(8, 30, generator=g, dtype=torch.float64),
            torch.randn(8, 5, generator=g, dtype=torch.float64))


def loss(net, x, y):
    return ((net(x) - y) ** 2).sum()


def _train(rank: int, world: int, folder: str, queue) -> None:
    try:
        _train_or_raise(rank, world, folder, queue)
    except BaseException:  # the parent fails with it instead of waiting on the queue
        queue.put((rank, traceback.format_exc()))
        raise


def _train_or_raise(rank: int, world: int, folder: str, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank,
                            world_size=world)
    try:
        shared_grads.SHM = Path(folder) / "shm"  # not the machine's /dev/shm
        net = model()
        ddp = wrap(net, Group.current(), torch.device("cpu"))
        found = sorted(os.listdir(shared_grads.SHM))
        gloo = DistributedDataParallel(copy.deepcopy(net))  # DDP's own all-reduce
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, gloo.module)]
        grads, params, gloo_params = [], [], []
        for step in range(3):
            x, y = data(rank, step)
            for m, opt in ((ddp, opts[0]), (gloo, opts[1])):
                opt.zero_grad()
                loss(m, x, y).backward()
                opt.step()
            # as numpy: a tensor on the queue would be shared by a file descriptor that dies
            # with this process
            grads.append([p.grad.numpy().copy() for p in net.parameters()])
            params.append([p.detach().numpy().copy() for p in net.parameters()])
            gloo_params.append([p.detach().numpy().copy() for p in gloo.module.parameters()])
        queue.put((rank, found, type(ddp).__name__,
                   len(ddp._comm_hooks) if hasattr(ddp, "_comm_hooks") else 0,
                   grads, params, gloo_params))
        del ddp, gloo
    finally:
        dist.destroy_process_group()


def run_group(world: int, folder: Path) -> dict:
    (folder / "shm").mkdir()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_train, args=(r, world, str(folder), queue))
             for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(world):
        rank, *rest = queue.get(timeout=120)
        assert not isinstance(rest[0], str), rest[0]
        got[rank] = rest
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return got


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_averages_through_shared_memory_as_the_formula_says(tmp_path, world):
    got = run_group(world, tmp_path)
    for rank in range(world):
        found, kind, hooks, *_ = got[rank]
        assert kind == "DistributedDataParallel" and hooks == 1
        assert found == []  # unlinked once every rank had it mapped
    # the same weights on every rank, bit for bit
    for rank in range(1, world):
        for a, b in zip(got[0][4], got[rank][4]):
            assert all(np.array_equal(p, q) for p, q in zip(a, b))
    # each step's gradient is the mean of the ranks' own gradients at the same weights
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(3):
        own = []
        for rank in range(world):
            net.zero_grad()
            loss(net, *data(rank, step)).backward()
            own.append([p.grad.clone() for p in net.parameters()])
        for i, p in enumerate(net.parameters()):
            p.grad = sum(g[i] for g in own) / world
            torch.testing.assert_close(torch.from_numpy(got[0][3][step][i]), p.grad,
                                       rtol=1e-12, atol=1e-12)
        opt.step()
        # and the weights follow DDP's own all-reduce's to rounding
        for ours, gloo in zip(got[0][4][step], got[0][5][step]):
            np.testing.assert_allclose(ours, gloo, rtol=1e-12, atol=1e-12)


def _map(rank: int, world: int, folder: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank,
                            world_size=world)
    try:
        # each rank looks in a folder of its own: as if on two machines
        mine = Path(folder) / f"shm{rank}"
        mine.mkdir()
        shared = map_shared_slots(10, rank, world, folder=mine)
        missing = map_shared_slots(10, rank, world, folder=Path(folder) / "absent")
        queue.put((rank, shared is None, missing is None, sorted(os.listdir(mine))))
    finally:
        dist.destroy_process_group()


def test_ranks_that_cannot_share_a_file_keep_gloo(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_map, args=(r, 2, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (queue.get(timeout=120) for _ in range(2)))
    for p in procs:
        p.join(60)
    assert got[0] == [True, True, []] and got[1] == [True, True, []]
