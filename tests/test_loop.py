"""The one training loop: keyed batches and coins, and what the README promises of its keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exvae_dist import config as config_mod
from exvae_dist.core.group import Group
from exvae_dist.core.loop import binarize, EpochBatches, rank_slice
from exvae_dist.core.objective import build_model
from exvae_dist.core.step import PriorSampler

REPO = Path(__file__).resolve().parent.parent


def test_global_batches_and_coins_do_not_depend_on_the_number_of_workers():
    """Each rank takes a slice of the same global batch, and every rank draws the same subset
    S for a global step: the union over ranks is the one-worker step, for W = 1, 2, 3."""
    cfg = config_mod.load(None, ["prior.rat=false", "prior.subsample=60",
                                 "model.hidden=16", "model.z_dim=4"], env={})
    torch.manual_seed(0)
    model = build_model(cfg)
    images = torch.rand(200, 784)
    sampler = PriorSampler(cfg.prior, images, seed=5)
    one = EpochBatches(200, 20, seed=5, epoch=3)
    assert EpochBatches(200, 20, seed=5, epoch=3)[4].tolist() == one[4].tolist()
    assert EpochBatches(200, 20, seed=5, epoch=4)[0].tolist() != one[0].tolist()
    assert sorted(np.concatenate(one).tolist()) == list(range(200))
    for world in (1, 2, 3):
        for step, ids in enumerate(one):
            parts = [rank_slice(ids, Group(rank, world)) for rank in range(world)]
            assert np.concatenate(parts).tolist() == ids.tolist()
            subsets = [sampler(model, p, images[p], step=30 + step).exemplars for p in parts]
            for s in subsets[1:]:
                assert torch.equal(s, subsets[0])
    # and the subset differs from step to step
    first = sampler(model, one[0], images[one[0]], step=0).exemplars
    assert not torch.equal(first, sampler(model, one[0], images[one[0]], step=1).exemplars)


def test_dynamic_binarization_is_keyed_by_step_and_rank():
    x = torch.full((50, 784), 0.5)
    a = binarize(x, True, seed=0, step=3, rank=0)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a, binarize(x, True, seed=0, step=3, rank=0))
    assert not torch.equal(a, binarize(x, True, seed=0, step=4, rank=0))
    assert not torch.equal(a, binarize(x, True, seed=0, step=3, rank=1))
    assert binarize(x, False, seed=0, step=3, rank=0) is x  # static data as stored
    assert abs(a.mean().item() - 0.5) < 0.01


def test_union_normalizer_leaves_the_normalizer_to_the_kept_count():
    """prior.normalizer=union: log_norm None, so the prior divides by the candidates kept
    (the reference code); subset: log |S minus {i}| per row."""
    from exvae_dist.core.exact import TorchExactSearch

    for normalizer in ("subset", "union"):
        cfg = config_mod.load(None, ["prior.k=5", f"prior.normalizer={normalizer}",
                                     "model.hidden=16", "model.z_dim=4"], env={})
        torch.manual_seed(0)
        model = build_model(cfg)
        images = torch.rand(300, 784)
        search = TorchExactSearch()
        search.update(model.net.encode_top(images)[0].detach())
        prior = PriorSampler(cfg.prior, images, search, seed=1)(model, np.arange(8),
                                                                images[:8], step=0)
        if normalizer == "union":
            assert prior.log_norm is None
            # the model then normalizes each row by its number of unmasked centres
            z = torch.randn(8, 4)
            centres = model.net.encode_top(prior.exemplars)[0].detach()
            got = model.log_prior(z, centres, prior.exclude, None)
            var = model.prior.log_var.exp()
            d2 = ((z[:, None, :] - centres[None]) ** 2).sum(-1)
            log_k = -0.5 * d2 / var - 0.5 * 4 * torch.log(2 * torch.pi * var)
            log_k = log_k.masked_fill(prior.exclude, -torch.inf)
            want = torch.logsumexp(log_k, 1) - torch.log((~prior.exclude).sum(1).double()).float()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            # M = N / 2 = 150 coins: |S| is about 150, less one where i itself is in S
            assert prior.log_norm is not None and prior.log_norm.shape == (8,)
            assert np.all(np.abs(prior.log_norm.numpy() - np.log(150)) < 0.25)


def test_ray_address_comes_from_the_environment_unless_overridden():
    env = {"RAY_ADDRESS": "127.0.0.1:6379", "EXVAE_DATA_DIR": "relative/data"}
    cfg = config_mod.load(None, [], env=env)
    assert cfg.ray.address == "127.0.0.1:6379"
    assert cfg.data.root == str(Path("relative/data").resolve())  # absolute at the entry
    assert config_mod.load(None, ["ray.address=10.0.0.1:1"], env=env).ray.address == "10.0.0.1:1"
    assert config_mod.load(None, [], env={}).ray.address is None  # no env below the entry


@pytest.mark.slow
def test_no_ray_trains_in_one_process(tmp_path, data_dir):
    """`python -m exvae_dist.train --no-ray` runs the one-process trainer: no exemplar store
    (the Ray trainer's data path), no Ray started, and the same summary."""
    env = {**os.environ, "EXVAE_DATA_DIR": str(data_dir)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-m", "exvae_dist.train", "--no-ray", "--config", "smoke",
         f"train.run_dir={tmp_path}", "train.epochs=1", "data.n_train=300", "data.n_valid=100",
         "train.progress=false", "tracking.enabled=false"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["step"] == 3
    assert (tmp_path / "smoke" / "summary.json").is_file()
    assert not (tmp_path / "smoke" / "store.zarr").exists()
    assert "ray" not in out.stderr.lower()
    # and Ray-only keys are refused there, in seconds, before any work
    bad = subprocess.run([sys.executable, "-m", "exvae_dist.train", "--no-ray",
                          "ray.num_workers=2"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "no effect in the one-process trainer" in bad.stderr


PURE_CORE = ("exvae_dist.core.loop", "exvae_dist.core.step", "exvae_dist.core.objective",
             "exvae_dist.core.priors", "exvae_dist.core.group", "exvae_dist.core.models",
             "exvae_dist.core.models.hvae", "exvae_dist.core.models.convhvae",
             "exvae_dist.core.models.likelihoods", "exvae_dist.core.candidates",
             "exvae_dist.core.keyed", "exvae_dist.core.exact", "exvae_dist.core.cache",
             "exvae_dist.core.shared_grads")
HEAVY = ("ray", "zarr", "mlflow", "faiss", "matplotlib")


def test_the_pure_core_imports_no_ray_zarr_mlflow_faiss_or_matplotlib():
    """Each module of the core, imported alone in a fresh interpreter, loads none of the
    libraries of the layers around it."""
    for module in PURE_CORE:
        code = (f"import sys, {module}; "
                f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=REPO)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[]", module
