"""Evaluation: the pooled / truncated exemplar prior against brute force, the importance-sampled
estimate through the evaluate code path, kNN against scikit-learn, and `python -m
exvae_dist.commands.evaluate` end to end on a tiny trained run (files, MLflow, clear errors)."""

import json

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from exvae_dist import config as config_mod
from exvae_dist.evaluation.knn import knn_errors
from exvae_dist.evaluation.likelihood import (estimate_log_likelihood,
                                              pooled_exemplar_log_prior, sorted_exemplars)
from exvae_dist.evaluation.runs import RunNotFoundError, load_run, resolve_run
from exvae_dist.core.objective import build_model, encode_means, importance_log_likelihood


def brute_log_prior(z, centres, log_var, k=None):
    """float64 numpy: log (1/N) sum_{n in the k nearest of z (all if k=None)} N(z; c_n, s^2 I)."""
    z, c = np.asarray(z, np.float64), np.asarray(centres, np.float64)
    n, d = c.shape
    d2 = ((z[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    if k is not None:
        d2 = np.sort(d2, axis=1)[:, :k]
    return logsumexp(-0.5 * d2 / np.exp(log_var), axis=1) - np.log(n) \
        - 0.5 * d * (np.log(2 * np.pi) + log_var)


def clustered(n, d, seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, d, generator=g) * 2.0
    return centres[torch.randint(0, 20, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("log_var", [-3.0, -1.0, 0.5])
def test_pooled_prior_matches_brute_force(log_var):
    # float64 throughout, so the comparisons can be tight (the code is dtype-generic)
    centres = clustered(2000, 8, 0).double()
    g = torch.Generator().manual_seed(1)
    mu = centres[7] + 0.1 * torch.randn(8, generator=g, dtype=torch.float64)
    z = mu + 0.4 * torch.randn(300, 8, generator=g, dtype=torch.float64)
    order, d2 = sorted_exemplars(mu[None], centres)
    lv = torch.tensor(log_var, dtype=torch.float64)
    exact = brute_log_prior(z, centres, log_var)
    got, pool, err = pooled_exemplar_log_prior(z, mu, centres, lv, order[0], d2[0], pool=16,
                                               tol=1e-6)
    assert np.allclose(got.numpy(), exact, rtol=0, atol=1e-6)
    assert 0.0 <= err <= 1e-6
    # pool=0: every exemplar, no certificate needed
    full, pool_full, _ = pooled_exemplar_log_prior(z, mu, centres, lv, order[0], d2[0], pool=0)
    assert (pool_full == 2000).all() and np.allclose(full.numpy(), exact, rtol=0, atol=1e-9)
    for k in (1, 10, 200):
        trunc, _, _ = pooled_exemplar_log_prior(z, mu, centres, lv, order[0], d2[0],
                                                neighbours=k, pool=16)
        assert np.allclose(trunc.numpy(), brute_log_prior(z, centres, log_var, k),
                           rtol=0, atol=1e-9)
        assert (trunc.numpy() <= exact + 1e-12).all()
        if k == 1:
            assert (trunc.numpy() < exact - 1e-3).mean() > 0.5  # a real gap, not equality
    # k = N is the exact prior
    all_k, _, _ = pooled_exemplar_log_prior(z, mu, centres, lv, order[0], d2[0],
                                            neighbours=2000, pool=16)
    assert np.allclose(all_k.numpy(), exact, rtol=0, atol=1e-9)


def test_pool_stays_small_when_exemplars_are_far():
    """The certificate lets a tight posterior skip most exemplars (the point of the pool)."""
    centres = clustered(5000, 8, 2, spread=1.0).double()
    mu = centres[0]
    z = mu + 0.05 * torch.randn(200, 8, generator=torch.Generator().manual_seed(3),
                                dtype=torch.float64)
    order, d2 = sorted_exemplars(mu[None], centres)
    got, pool, err = pooled_exemplar_log_prior(z, mu, centres, torch.tensor(-4.0).double(),
                                               order[0], d2[0], pool=64)
    assert pool.max() < 1000 and err <= 1e-6
    assert np.allclose(got.numpy(), brute_log_prior(z, centres, -4.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_each_sample_gets_the_pool_its_distance_needs(dtype):
    """Samples near the posterior mean are certified with fewer exemplars than far ones, and
    every sample still gets the exact prior (float32 to its round-off)."""
    centres = clustered(5000, 8, 2, spread=1.0).double()
    mu = centres[0]
    g = torch.Generator().manual_seed(4)
    near = mu + 0.05 * torch.randn(100, 8, generator=g, dtype=torch.float64)
    far = mu + 0.8 * torch.randn(100, 8, generator=g, dtype=torch.float64)
    z = torch.cat([near, far])
    order, d2 = sorted_exemplars(mu[None].to(dtype), centres.to(dtype))
    got, pool, err = pooled_exemplar_log_prior(z.to(dtype), mu.to(dtype), centres.to(dtype),
                                               torch.tensor(-2.0, dtype=dtype), order[0], d2[0],
                                               pool=32)
    exact = brute_log_prior(z, centres, -2.0)
    atol = 1e-6 if dtype == torch.float64 else 2e-3
    assert np.allclose(got.double().numpy(), exact, rtol=0, atol=atol)
    assert err <= 1e-6
    assert pool[:100].float().median() * 4 < pool[100:].float().median()


def test_a_sample_far_above_its_shift_is_redone_not_overflowed():
    """The exps are taken relative to each sample's best logit among the exemplars nearest to
    mu; a sample whose nearest exemplar lies far from mu beats that shift by more than exp
    can hold (float32: ~88 nats), and must be computed again with its true maximum."""
    g = torch.Generator().manual_seed(6)
    near_mu = torch.randn(200, 4, generator=g) * 0.5           # the 64+ nearest to mu = 0
    lone = torch.tensor([[3.0, 0.0, 0.0, 0.0]])                 # far from mu, right at z
    centres = torch.cat([near_mu, lone, 6.0 + torch.randn(300, 4, generator=g)])
    mu = torch.zeros(4)
    z = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]])
    order, d2 = sorted_exemplars(mu[None], centres)
    got, _, err = pooled_exemplar_log_prior(z, mu, centres, torch.tensor(-4.0), order[0], d2[0],
                                            pool=16)
    assert torch.isfinite(got).all()
    assert np.allclose(got.double().numpy(), brute_log_prior(z, centres, -4.0), rtol=0,
                       atol=1e-3)


@pytest.fixture(scope="module")
def small_model():
    """A small untrained MLP VAE with an exemplar prior and centres near its posterior means."""
    torch.manual_seed(0)
    cfg = config_mod.load(None, ["model.hidden=32", "model.z_dim=6", "prior.kind=exemplar"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.prior.log_var.fill_(-1.5)
    images = (torch.rand(400, 784) < 0.2).float()
    centres = encode_means(model.net, images) + 0.3 * torch.randn(400, 6)
    x = (torch.rand(4, 784) < 0.2).float()
    return model, centres, x


def test_importance_estimate_matches_objective_and_bounds(small_model):
    """Through the evaluate code path: the exact-prior estimate equals objective's brute-force
    estimate on the same samples; the truncated prior equals it at k = N, is below it otherwise."""
    model, centres, x = small_model
    torch.manual_seed(5)
    ref = importance_log_likelihood(model, x, 300, centres, sample_chunk=100)
    torch.manual_seed(5)
    exact = estimate_log_likelihood(model, x, 300, centres, pool=8, sample_chunk=100)
    assert torch.allclose(exact.log_px, ref, atol=1e-3)
    torch.manual_seed(5)
    all_k = estimate_log_likelihood(model, x, 300, centres, neighbours=400, pool=8, sample_chunk=100)
    assert torch.allclose(all_k.log_px, ref, atol=1e-3)
    for k in (1, 5):
        torch.manual_seed(5)
        low = estimate_log_likelihood(model, x, 300, centres, neighbours=k, pool=8, sample_chunk=100)
        assert (low.log_px <= ref + 1e-4).all()
    with pytest.raises(ValueError, match="neighbours"):
        estimate_log_likelihood(model, x, 10, centres, neighbours=0)
    with pytest.raises(ValueError, match="centres"):
        estimate_log_likelihood(model, x, 10, None)


def test_knn_error_matches_sklearn():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(600, 5))
    ref_y = rng.integers(0, 4, 600)  # noisy labels: many vote ties between classes
    query = rng.normal(size=(300, 5))
    query_y = rng.integers(0, 4, 300)
    ks = (1, 2, 3, 4, 5, 8, 15)
    ours = knn_errors(torch.from_numpy(ref), torch.from_numpy(ref_y), torch.from_numpy(query),
                      torch.from_numpy(query_y), ks)
    for k in ks:
        clf = KNeighborsClassifier(n_neighbors=k).fit(ref, ref_y)
        assert ours[k] == pytest.approx(float(np.mean(clf.predict(query) != query_y)), abs=1e-12)


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
    from exvae_dist.train.local import fit

    root = tmp_path_factory.mktemp("runs")
    cfg = config_mod.load("smoke", [f"train.run_dir={root}", "train.epochs=1",
                                    "train.max_steps_per_epoch=5", "train.progress=false", "train.threads=1",
                                    "data.n_train=500", "data.n_valid=100", "data.n_test=60",
                                    "tracking.sample_grid=false"],
                          env={"EXVAE_DATA_DIR": str(data_dir)})
    fit(cfg)
    return cfg.run_path(), root


def test_evaluate_end_to_end(trained_run, data_dir, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from exvae_dist.commands.evaluate import main

    run, root = trained_run
    monkeypatch.setenv("EXVAE_DATA_DIR", str(data_dir))
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    # an MLflow run id resolves through the mlflow_run.json files under train.run_dir
    assert resolve_run(run_id, [f"train.run_dir={root}"]) == run
    rc = main([run_id, f"train.run_dir={root}", "eval.n_samples=40", "eval.n_test=20",
               "eval.knn_ks=[1,3]"])
    assert rc == 0
    (out,) = (run / "eval").iterdir()  # its own folder, named by the UTC start time
    assert out.name.endswith("Z")
    names = {"summary.json", "samples.png", "exemplar_samples.png", "reconstructions.png",
             "interpolations.png", "tsne.png"}
    assert names <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.tmp*"))
    s = json.loads((out / "summary.json").read_text())
    assert s["written_to"] == str(out)
    ll = s["log_likelihood"]
    assert ll["n_images"] == 20 and ll["n_samples"] == 40 and not ll["is_lower_bound"]
    assert "exact exemplar prior over all N=500" in ll["prior"]
    assert np.isfinite(ll["value"]) and ll["value"] < 0
    # log p(x) >= ELBO in expectation; with 40 samples the gap is large enough to be safe
    assert ll["value"] > s["test_elbo"] - 5
    assert set(s["knn_error"]) == {"1", "3"} and 0 <= s["knn_error"]["3"] <= 1
    assert 0 <= s["active_units"] <= 40
    info = json.loads((run / "mlflow_run.json").read_text())
    client = MlflowClient(info["uri"])
    metrics = client.get_run(run_id).data.metrics
    assert "test_log_likelihood" in metrics and "test_knn_error_k3" in metrics
    logged = {a.path for a in client.list_artifacts(run_id, f"eval/{out.name}")}
    assert {f"eval/{out.name}/{n}" for n in names} <= logged
    # the truncated prior is labelled as a lower bound everywhere; a named evaluation gets
    # (and, run again, replaces) its own folder: the first one's pictures are kept, none stale
    for _ in range(2):
        assert main([str(run), "eval.n_samples=20", "eval.n_test=5", "eval.prior_neighbours=3",
                     "eval.knn=false", "eval.pictures=false", "eval.name=truncated"]) == 0
    assert names <= {p.name for p in out.iterdir()}
    assert {p.name for p in (run / "eval" / "truncated").iterdir()} == {"summary.json"}
    s = json.loads((run / "eval" / "truncated" / "summary.json").read_text())
    assert s["log_likelihood"]["is_lower_bound"]
    assert s["log_likelihood"]["prior"].startswith("LOWER BOUND")
    assert "test_log_likelihood_lower_bound" in client.get_run(run_id).data.metrics
    assert '"prior": "LOWER BOUND' in capsys.readouterr().out


def test_missing_run_and_missing_checkpoint_are_clear_errors(tmp_path, capsys):
    from exvae_dist.commands.evaluate import main

    with pytest.raises(RunNotFoundError, match="neither a run directory nor an MLflow run id"):
        load_run(str(tmp_path / "nope"), [f"train.run_dir={tmp_path}"])
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no best.pt or checkpoint.pt"):
        load_run(str(empty))
    assert main([str(empty)]) == 2
    assert "holds no best.pt" in capsys.readouterr().err


def test_bad_override_names_the_key(trained_run):
    run, _ = trained_run
    with pytest.raises(config_mod.ConfigError, match="eval.no_such_key"):
        load_run(str(run), ["eval.no_such_key=1"])


@pytest.mark.parametrize("override, words", [
    ("eval.knn_ks=[3,1000]", "k=1000 exceeds the 600 reference vectors"),
    ("eval.exemplars=7", "no exemplar set version 7"),
    ("eval.test_labels=[12]", "eval.test_labels=[12] keeps no test image of mnist")])
def test_a_bad_evaluation_setting_fails_before_any_work_or_folder(trained_run, data_dir,
                                                                  monkeypatch, capsys,
                                                                  override, words):
    from exvae_dist.commands.evaluate import main

    run, _ = trained_run
    monkeypatch.setenv("EXVAE_DATA_DIR", str(data_dir))
    before = sorted((run / "eval").iterdir()) if (run / "eval").exists() else []
    assert main([str(run), override, "eval.name=refused", "eval.pictures=false"]) == 2
    err = capsys.readouterr().err
    assert words in err and "test log-likelihood" not in err
    after = sorted((run / "eval").iterdir()) if (run / "eval").exists() else []
    assert after == before  # no empty folder left behind


def test_a_corrupt_checkpoint_names_the_other_one(trained_run, tmp_path, capsys):
    import shutil

    from exvae_dist.commands.evaluate import main

    run, _ = trained_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "best.pt").write_bytes(b"torn")
    assert main([str(copy)]) == 2
    err = capsys.readouterr().err
    assert "best.pt is unreadable" in err and "checkpoint.pt: eval.checkpoint=latest" in err
    assert "Traceback" not in err
    (copy / "checkpoint.pt").unlink()  # no other checkpoint: no hint pointing at one
    assert main([str(copy)]) == 2
    assert "eval.checkpoint" not in capsys.readouterr().err
