"""The CUDA paths (train.device=cuda): skipped where torch sees no GPU, as in CI.

Run them on a GPU machine with `python -m pytest -q tests/test_cuda.py`. Each compares the GPU
against the CPU computing the same thing: the same step with the same noise, the same
neighbours, the same log-densities, and a short GPU run evaluated on both devices.
"""

import json
import math

import numpy as np
import pytest
import torch

from exvae_dist import config as config_mod
from exvae_dist.evaluation.likelihood import estimate_log_likelihood
from exvae_dist.core.objective import build_model
from exvae_dist.core.priors import exemplar_log_prob
from exvae_dist.core.exact import TorchExactSearch
from exvae_dist.core.step import PriorBatch, train_step
from exvae_dist.core.loop import make_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")


def cpu_noise(monkeypatch):
    """torch.randn drawn on the CPU from one seeded stream, then moved to the asked device, so
    a CPU and a GPU forward pass see the same reparameterization noise."""
    real = torch.randn
    gen = torch.Generator().manual_seed(0)

    def randn(*size, device=None, dtype=None, generator=None, **kw):
        out = real(*size, dtype=dtype, generator=gen, **kw)
        return out.to(device) if device is not None else out

    monkeypatch.setattr(torch, "randn", randn)
    return gen


def test_training_step_on_cuda_equals_cpu(monkeypatch, data_dir):
    cfg = config_mod.load("smoke", ["train.exemplar_precision=float32"])
    torch.manual_seed(0)
    cpu_model = build_model(cfg, (1, 28, 28))
    gpu_model = build_model(cfg, (1, 28, 28))
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(CUDA)
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.random((20, 784)) < 0.3).astype(np.float32))
    exemplars = torch.from_numpy(rng.random((60, 784)).astype(np.float32))
    exclude = torch.zeros(20, 60, dtype=torch.bool)
    exclude[torch.arange(20), torch.arange(20)] = True  # the batch = the first 20 exemplars

    results = []
    gen = cpu_noise(monkeypatch)
    for model, device in ((cpu_model, torch.device("cpu")), (gpu_model, CUDA)):
        gen.manual_seed(1)
        opt = make_optimizer(model, cfg)
        prior = PriorBatch(exemplars=exemplars.to(device), exclude=exclude.to(device),
                           n_candidates=60)
        m = train_step(model, opt, x.to(device), prior, beta=0.7)
        # train_step leaves each parameter's gradient divided by its norm (unit vectors)
        results.append((m, [p.grad.cpu() for p in model.parameters()]))
    (m_cpu, g_cpu), (m_gpu, g_gpu) = results
    assert m_gpu["loss"] == pytest.approx(m_cpu["loss"], rel=1e-4)
    assert sum(g.abs().sum().item() for g in g_cpu) > 0
    for a, b in zip(g_cpu, g_gpu):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def test_exemplar_log_prob_on_cuda_matches_float64():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 40))
    centres = rng.normal(size=(5000, 40)) * 3
    centres[:100] += 200.0  # far centres: exp underflows without the running maximum
    exclude = rng.random((64, 5000)) < 0.2
    log_var = -1.3
    got = exemplar_log_prob(torch.tensor(z, dtype=torch.float32, device=CUDA),
                            torch.tensor(centres, dtype=torch.float32, device=CUDA),
                            torch.tensor(log_var, device=CUDA),
                            torch.from_numpy(exclude).to(CUDA)).double().cpu().numpy()
    d2 = ((z[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    logits = -0.5 * d2 / math.exp(log_var) - 0.5 * 40 * (math.log(2 * math.pi) + log_var)
    logits[exclude] = -np.inf
    top = logits.max(1, keepdims=True)
    want = (top[:, 0] + np.log(np.exp(logits - top).sum(1))
            - np.log((~exclude).sum(1)))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)


def test_exact_search_on_cuda_equals_brute_force():
    rng = np.random.default_rng(1)
    latents = rng.normal(size=(20000, 40)).astype(np.float32)
    queries = rng.normal(size=(128, 40)).astype(np.float32)
    search = TorchExactSearch(block=4096)
    search.update(torch.from_numpy(latents).to(CUDA))
    ids, _ = search.search(queries, 10)
    d2 = ((queries[:, None, :].astype(np.float64) - latents[None].astype(np.float64)) ** 2).sum(-1)
    want = np.argsort(d2, axis=1)[:, :10]
    # equal up to exact ties in float32 distance: compare the distances of the returned ids
    np.testing.assert_allclose(np.take_along_axis(d2, ids, 1), np.take_along_axis(d2, want, 1),
                               rtol=1e-5)


def test_short_cuda_run_trains_resumes_and_evaluates_like_cpu(tmp_path, data_dir):
    from exvae_dist.commands.evaluate import evaluate
    from exvae_dist.evaluation.runs import load_run
    from exvae_dist.train.local import fit

    common = [f"train.run_dir={tmp_path}", "train.progress=false", "data.n_train=1000",
              "data.n_valid=200", "tracking.enabled=false"]
    env = {"EXVAE_DATA_DIR": str(data_dir)}
    cfg = config_mod.load("smoke", common + ["train.device=cuda", "train.epochs=2"], env=env)
    first = fit(cfg)
    assert first["epoch"] == 2 and math.isfinite(first["val_elbo"])
    again = fit(config_mod.load("smoke", common + ["train.device=cuda", "train.epochs=3"],
                                env=env))
    assert again["epoch"] == 3 and again["step"] == first["step"] + 10
    recs = [json.loads(line) for line in (cfg.run_path() / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if "val_elbo" in r]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]

    # the same checkpoint evaluated on both devices: the same estimates within sampling noise
    eval_keys = ["eval.n_test=100", "eval.n_samples=500", "eval.knn=false", "eval.pictures=false"]
    out = {}
    for device in ("cuda", "cpu"):
        trained = load_run(str(cfg.run_path()), eval_keys + [f"train.device={device}"], env=env)
        out[device] = evaluate(trained)
    # the same images, different random streams: only the estimators' own noise differs
    ll_gpu, ll_cpu = out["cuda"]["log_likelihood"], out["cpu"]["log_likelihood"]
    assert math.isfinite(ll_gpu["value"]) and ll_gpu["value"] < 0
    assert abs(ll_gpu["value"] - ll_cpu["value"]) < 0.3
    assert abs(out["cuda"]["test_elbo"] - out["cpu"]["test_elbo"]) < 3.0
    # encoder means are deterministic: the same per-unit variances on both devices
    np.testing.assert_allclose(out["cuda"]["unit_variances"], out["cpu"]["unit_variances"],
                               rtol=1e-3, atol=1e-6)


def test_likelihood_estimate_on_cuda_matches_cpu_all_exemplars():
    """The certified-pool estimate and the plain all-N sum agree on the GPU (tails, pools and
    thresholds all computed on the device)."""
    cfg = config_mod.load("smoke", [])
    torch.manual_seed(0)
    model = build_model(cfg, (1, 28, 28)).to(CUDA).eval()
    rng = np.random.default_rng(2)
    x = torch.from_numpy((rng.random((4, 784)) < 0.3).astype(np.float32)).to(CUDA)
    centres = torch.from_numpy(rng.normal(size=(3000, 40)).astype(np.float32)).to(CUDA)
    torch.manual_seed(5)
    pooled = estimate_log_likelihood(model, x, 300, centres, pool=256)
    torch.manual_seed(5)
    full = estimate_log_likelihood(model, x, 300, centres, pool=0)
    torch.testing.assert_close(pooled.log_px, full.log_px, rtol=0, atol=1e-3)
    assert pooled.max_error <= 1e-6


def test_augment_on_cuda_matches_cpu(tmp_path, data_dir):
    """The same short augmentation run on both devices: the real-only classifier starts from
    the same weights and walks the same batches, so its errors agree up to float round-off
    (a handful of the 10,000 test images); the augmented one sees other generated noise."""
    from exvae_dist.commands.augment import augment
    from exvae_dist.evaluation.runs import load_run
    from exvae_dist.train.local import fit

    env = {"EXVAE_DATA_DIR": str(data_dir)}
    cfg = config_mod.load("smoke", [f"train.run_dir={tmp_path}", "train.epochs=1",
                                    "train.progress=false", "data.n_train=1000",
                                    "data.n_valid=100", "tracking.enabled=false"], env=env)
    fit(cfg)
    keys = ["augment.hidden=64", "augment.epochs=2", "train.progress=false"]
    out = {d: augment(load_run(str(cfg.run_path()), keys + [f"train.device={d}"], env=env))
           for d in ("cuda", "cpu")}
    assert abs(out["cuda"]["test_error_real_only"] - out["cpu"]["test_error_real_only"]) < 0.005
    assert abs(out["cuda"]["test_error_augmented"] - out["cpu"]["test_error_augmented"]) < 0.05
    assert 0.0 < out["cuda"]["test_error_augmented"] < 0.9  # better than chance (10 classes)
