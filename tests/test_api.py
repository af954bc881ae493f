"""The Python API (exvae_dist.fit, exvae_dist.ExemplarVAE) on a run fitted once from an
in-memory array: the same numbers as the commands (evaluate's log-likelihood, generate's
draws), checked against brute force where there is math, clear errors for bad images, and
the MLflow model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import exvae_dist
from exvae_dist import config as config_mod
from exvae_dist.data import load_dataset
from exvae_dist.api import InputShapeError
from exvae_dist.api.mlflow_model import log_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mnist_600(data_dir):
    cfg = config_mod.load("smoke", ["data.n_train=600"], env={"EXVAE_DATA_DIR": str(data_dir)})
    s = load_dataset(cfg.data)
    return np.rint(s.train_x * 255).astype(np.uint8).reshape(-1, 1, 28, 28), s.train_y


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, mnist_600, data_dir):
    os.environ.setdefault("EXVAE_DATA_DIR", str(data_dir))
    images, labels = mnist_600
    root = tmp_path_factory.mktemp("runs")
    model = exvae_dist.fit(images, labels, config="smoke", valid=100, test=100,
                           train={"run_dir": str(root), "epochs": 1, "max_steps_per_epoch": 5,
                                  "progress": False, "threads": 1},
                           **{"tracking.sample_grid": False})
    return model, root


def test_fit_trains_on_the_array_and_returns_the_run(fitted, mnist_600):
    model, root = fitted
    images, labels = mnist_600
    assert model.trained.path == root / "smoke"
    assert (root / "smoke" / "best.pt").is_file()
    # the array was ingested once (100 + 100 rows held out) and is the exemplar set
    assert model.config.data.name == "store"
    ex = model.exemplar_set
    assert len(ex.images) == 400
    # every exemplar is one of the given images, with its label (brute-force lookup)
    rows = {img.tobytes(): lab for img, lab in zip(images.reshape(600, -1), labels)}
    as_uint8 = np.rint(ex.images * 255).astype(np.uint8)
    assert all(rows[r.tobytes()] == lab for r, lab in zip(as_uint8, ex.labels))
    # the best checkpoint was logged as an MLflow model, its weights also as safetensors
    assert (root / "smoke" / "best.safetensors").is_file()


def test_fit_again_resumes_and_a_changed_setting_is_refused(fitted, mnist_600):
    from exvae_dist.runs.run_folder import RunFolderError

    model, root = fitted
    images, labels = mnist_600
    keys = dict(config="smoke", valid=100, test=100,
                train={"run_dir": str(root), "epochs": 1, "max_steps_per_epoch": 5,
                       "progress": False, "threads": 1}, **{"tracking.sample_grid": False})
    stores = sorted((root / "stores").iterdir())
    again = exvae_dist.fit(images, labels, **keys)
    assert again.trained.path == model.trained.path
    assert sorted((root / "stores").iterdir()) == stores  # the same array, the same store
    resumed = [json.loads(line) for line in
               (root / "smoke" / "sessions.jsonl").read_text().splitlines()][-1]
    assert resumed["from_epoch"] >= 1  # picked up the finished run, did not start over
    with pytest.raises(RunFolderError, match="train.lr"):
        exvae_dist.fit(images, labels, **{**keys, "train": {**keys["train"], "lr": 0.01}})


@pytest.mark.slow
def test_fit_on_ray(tmp_path, mnist_600):
    images, labels = mnist_600
    model = exvae_dist.fit(images, labels, config="smoke", ray=True, valid=100, test=100,
                           train={"run_dir": str(tmp_path), "epochs": 1,
                                  "max_steps_per_epoch": 3, "progress": False, "threads": 1},
                           **{"ray.num_workers": 1, "tracking.enabled": False})
    assert (tmp_path / "smoke" / "summary.json").is_file()
    assert np.isfinite(model.log_prob(model.splits.test_x[:2], n_samples=10)).all()


def test_log_prob_equals_evaluate_with_the_same_seed(fitted, capsys):
    from exvae_dist.commands.evaluate import main

    model, root = fitted
    rc = main([str(model.trained.path), "eval.n_samples=30", "eval.n_test=12",
               "eval.knn=false", "eval.pictures=false", "eval.name=api", "train.progress=false"])
    assert rc == 0
    summary = json.loads((model.trained.path / "eval" / "api" / "summary.json").read_text())
    mine = model.log_prob(model.splits.test_x[:12], n_samples=30)
    assert mine.shape == (12,)
    assert mine.mean() == pytest.approx(summary["log_likelihood"]["value"], rel=0, abs=1e-9)
    # one image: a float, the same value as in the batch of the same seed's first draw
    assert isinstance(model.log_prob(model.splits.test_x[0], n_samples=30), float)


def test_log_prob_is_the_exact_prior_estimate_against_brute_force(fitted):
    """The certified-pool estimate equals the importance estimate with every exemplar,
    computed here in float64 numpy from the same posterior draws."""
    model, _ = fitted
    net, x = model.model.net, torch.from_numpy(model.splits.test_x[:3])
    centres = model.centres().double().numpy()
    log_var = model.model.prior.log_var.item()
    n, d = centres.shape
    torch.manual_seed(7)
    with torch.no_grad():
        terms = net.terms(x, 50)
    z = terms.z_top.double().numpy()  # [S, B, d]
    d2 = ((z[:, :, None, :] - centres[None, None]) ** 2).sum(-1)
    log_prior = (logsumexp(-0.5 * d2 / np.exp(log_var), axis=2) - np.log(n)
                 - 0.5 * d * (np.log(2 * np.pi) + log_var))
    w = terms.log_px.double().numpy() + terms.log_p_cond.double().numpy() + log_prior \
        - terms.log_q.double().numpy()
    brute = logsumexp(w, axis=0) - np.log(50)
    got = model.log_prob(x.numpy(), n_samples=50, seed=7)
    assert np.allclose(got, brute, rtol=0, atol=1e-3)


def test_sample_ids_and_labels_match_generate(fitted, tmp_path):
    from exvae_dist.commands.generate import main

    model, _ = fitted
    images, ids = model.sample(20, seed=3)
    assert images.shape == (20, 1, 28, 28) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1
    out = tmp_path / "g.npz"
    assert main([str(model.trained.path), "--n", "20", "--seed", "3", "--out", str(out),
                 "train.progress=false"]) == 0
    with np.load(out) as g:
        assert (g["exemplar_ids"] == ids).all()
        assert (g["labels"] == model.exemplar_labels(ids)).all()
        assert (g["images"] == np.rint(images * 255).astype(np.uint8)).all()
    # conditioned draws come from the exemplars asked for, in turn
    _, fixed = model.sample(6, exemplars=[5, 9], seed=0)
    assert fixed.tolist() == [5, 9, 5, 9, 5, 9]


def test_inputs_uint8_float_one_or_batch_and_clear_errors(fitted):
    model, _ = fitted
    x = model.exemplar_set.images[:4]
    as_uint8 = np.rint(x * 255).astype(np.uint8).reshape(4, 1, 28, 28)
    m_float, _ = model.encode(x)
    m_uint8, lv = model.encode(torch.from_numpy(as_uint8))
    assert np.allclose(m_float, m_uint8, atol=1e-6) and lv.shape == (4, 40)
    assert model.encode(as_uint8[0, 0])[0].shape == (40,)  # one [H, W] grey image
    assert model.reconstruct(x).shape == (4, 1, 28, 28)
    with pytest.raises(InputShapeError, match=r"shape \(3, 27, 28\).*\[B, 1, 28, 28\]"):
        model.log_prob(np.zeros((3, 27, 28), np.uint8))
    with pytest.raises(InputShapeError, match=r"\[0, 1\].*divide levels by 255"):
        model.elbo(x * 255)
    with pytest.raises(InputShapeError, match="empty batch"):
        model.encode(np.zeros((0, 784), np.float32))


def test_load_arguments_and_overrides(fitted):
    model, _ = fitted
    path = model.trained.path
    assert exvae_dist.ExemplarVAE.load(path).trained.checkpoint.name == "best.pt"
    assert exvae_dist.ExemplarVAE.load(path, checkpoint="latest").trained.checkpoint.name \
        == "checkpoint.pt"
    # an override of the same key wins over the argument's default
    over = exvae_dist.ExemplarVAE.load(path, overrides=["eval.checkpoint=latest"])
    assert over.trained.checkpoint.name == "checkpoint.pt"
    file = exvae_dist.ExemplarVAE.load(path / "checkpoint.pt")
    assert file.trained.checkpoint == path / "checkpoint.pt" and file.trained.path == path


def test_nearest_exemplars_against_brute_force(fitted):
    model, _ = fitted
    x = model.splits.valid_x[:5]
    ids, dist = model.nearest_exemplars(x, k=4)
    means, _ = model.encode(x)
    full = np.sqrt(((means[:, None, :].astype(np.float64)
                     - model.exemplar_set.latents[None].astype(np.float64)) ** 2).sum(-1))
    assert (ids == np.argsort(full, axis=1)[:, :4]).all()
    assert np.allclose(dist, np.sort(full, axis=1)[:, :4], atol=1e-3)
    # an exemplar's nearest exemplar is itself
    own, d0 = model.nearest_exemplars(model.exemplar_set.images[17], k=1)
    assert own.tolist() == [17] and d0[0] < 1e-3


def test_explain_and_add_exemplars(fitted, mnist_600):
    model, _ = fitted
    row = model.explain(model.exemplar_set.images[3], k=3, n_samples=20)
    assert len(row["top_exemplars"]) == 3 and abs(row["weight_sum"] - 1) < 1e-6
    # growing the set: valid images not yet exemplars join as a new version
    new = model.splits.valid_x[:7]
    version = model.add_exemplars(new, labels=np.arange(7))
    assert version == 2 and len(model.exemplar_set.images) == 407
    ids, _ = model.nearest_exemplars(model.exemplar_set.images[-1], k=1)
    assert ids.tolist() == [406]
    again = exvae_dist.ExemplarVAE.load(model.trained.path)  # grown by default, as the commands
    assert len(again.exemplar_set.images) == 407
    orig = exvae_dist.ExemplarVAE.load(model.trained.path, exemplars="original")
    assert len(orig.exemplar_set.images) == 400


def test_mlflow_model_predicts_log_likelihoods_and_registers(fitted):
    import mlflow

    model, root = fitted
    model = exvae_dist.ExemplarVAE.load(model.trained.path, exemplars="original")
    info = log_model(model, registered_model_name="exvae-test")
    mlflow.set_tracking_uri(json.loads((model.trained.path / "mlflow_run.json").read_text())["uri"])
    x = model.splits.test_x[:3]
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    got = pyfunc.predict(x, params={"n_samples": 20, "seed": 1})
    assert got.shape == (3,) and np.isfinite(got).all()
    assert np.allclose(got, model.log_prob(x, n_samples=20, seed=1))
    assert pyfunc.predict(x, params={"output": "sample", "n": 4}).shape == (4, 784)
    run_id = json.loads((model.trained.path / "mlflow_run.json").read_text())["run_id"]
    by_run = exvae_dist.ExemplarVAE.load(f"runs:/{run_id}/model", exemplars="original")
    assert np.allclose(by_run.log_prob(x, n_samples=20, seed=1), got)
    by_id = exvae_dist.ExemplarVAE.load(run_id, train={"run_dir": str(root)})
    assert by_id.trained.path == model.trained.path
    registered = exvae_dist.ExemplarVAE.load("models:/exvae-test/1")
    assert len(registered.exemplar_set.images) == 400
    assert np.allclose(registered.log_prob(x, n_samples=20, seed=1), got)
    # the weights as safetensors equal the checkpoint's
    from safetensors.torch import load_file

    weights = load_file(str(model.trained.path / "best.safetensors"))
    state = model.model.state_dict()
    assert set(weights) == set(state) and all(torch.equal(weights[k], state[k]) for k in state)


def test_a_large_exemplar_set_is_pointed_to_not_copied(fitted, monkeypatch):
    import mlflow

    from exvae_dist.api import mlflow_model

    model, _ = fitted
    model = exvae_dist.ExemplarVAE.load(model.trained.path, exemplars="original")
    monkeypatch.setattr(mlflow_model, "INLINE_BYTES", 400 * 784 - 1)
    info = log_model(model)
    mlflow.set_tracking_uri(json.loads((model.trained.path / "mlflow_run.json").read_text())["uri"])
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(info.model_uri)).rglob("*")}
    assert "exemplars.json" in files and "exemplars.npz" not in files
    loaded = exvae_dist.ExemplarVAE.load(info.model_uri, exemplars="original")
    assert np.array_equal(loaded.exemplar_set.latents, model.exemplar_set.latents)


def test_examples_script_runs(tmp_path, data_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "EXVAE_DATA_DIR": str(data_dir)}
    done = subprocess.run([sys.executable, str(REPO / "examples" / "notebook.py")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "log p(x) of 8 test images" in done.stdout
    assert (tmp_path / "runs" / "notebook" / "best.pt").is_file()


def test_evaluate_stopped_leaves_no_folder_and_shows_progress_lines(fitted, monkeypatch,
                                                                    capsys):
    from exvae_dist import api
    from exvae_dist.commands.evaluate import main

    model, _ = fitted
    evals = model.trained.path / "eval"
    before = sorted(p.name for p in evals.iterdir()) if evals.is_dir() else []

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api.ExemplarVAE, "_log_prob", stop)
    with pytest.raises(KeyboardInterrupt):
        main([str(model.trained.path), "eval.n_samples=5", "eval.n_test=4", "eval.knn=false",
              "eval.pictures=false", "eval.name=stopped"])
    after = sorted(p.name for p in evals.iterdir()) if evals.is_dir() else []
    assert after == before
    monkeypatch.undo()
    # without a terminal the progress bar writes whole lines (with the ETA), no \r redraws
    capsys.readouterr()
    from exvae_dist.common.progress import progress_bar

    for _ in progress_bar(range(3), desc="log-likelihood", total=3):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    assert all(line.startswith("log-likelihood") for line in err.splitlines())
    assert "3/3" in err.splitlines()[-1]
