"""Generative data augmentation end to end on a tiny trained run, plus its pieces."""

import json

import pytest
import torch

from exvae_dist import config as config_mod
from exvae_dist.commands.augment import Generator, main, make_classifier, train_classifier


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
    from exvae_dist.train.local import fit

    root = tmp_path_factory.mktemp("runs")
    cfg = config_mod.load("smoke", [f"train.run_dir={root}", "train.epochs=1",
                                    "train.max_steps_per_epoch=5", "train.progress=false",
                                    "train.threads=1", "data.n_train=500", "data.n_valid=100",
                                    "data.n_test=300", "tracking.sample_grid=false"],
                          env={"EXVAE_DATA_DIR": str(data_dir)})
    fit(cfg)
    return cfg.run_path()


def test_augment_end_to_end(trained_run, data_dir, monkeypatch, capsys, caplog):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("EXVAE_DATA_DIR", str(data_dir))
    caplog.set_level("INFO", logger="exvae_dist.commands.augment")
    rc = main([str(trained_run), "augment.hidden=16", "augment.epochs=2", "augment.seed=3",
               "train.progress=false"])
    assert rc == 0
    s = json.loads((trained_run / "augment" / "summary.json").read_text())
    # data.n_test is the test set here too, and the log says what is really evaluated
    assert s["classifier"] == "MLP 784-16-16-10 ReLU" and s["n_test"] == 300
    assert "tested on 300 grey test images" in caplog.text
    assert s["generated_images"] == "decoder pixel means"
    assert s["generated_from"].startswith("exemplar-conditioned")
    for key in ("test_error_real_only", "test_error_augmented"):
        assert 0.0 <= s[key] < 0.9  # 500 images, 2 epochs: far better than chance
    assert len(s["real_only"]["test_error_per_epoch"]) == 2
    info = json.loads((trained_run / "mlflow_run.json").read_text())
    client = MlflowClient(info["uri"])
    assert "augment_test_error_augmented" in client.get_run(info["run_id"]).data.metrics
    assert '"test_error_augmented"' in capsys.readouterr().out


def test_same_seed_same_classifier_and_fresh_samples(trained_run, data_dir, monkeypatch):
    from exvae_dist.evaluation.runs import load_run

    monkeypatch.setenv("EXVAE_DATA_DIR", str(data_dir))
    trained = load_run(str(trained_run), ["augment.hidden=8", "augment.epochs=1",
                                          "augment.generated=bernoulli"])
    a = trained.cfg.augment
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 784, generator=g)
    y = torch.randint(0, 10, (300,), generator=g)
    # real-only training is a deterministic function of the seed
    r1 = train_classifier(x, y, x[:50], y[:50], a, progress=False)
    r2 = train_classifier(x, y, x[:50], y[:50], a, progress=False)
    assert r1["test_error"] == r2["test_error"]
    gen = Generator(trained.model, x, "bernoulli", torch.Generator().manual_seed(1))
    ids = torch.arange(5)
    s1, s2 = gen(ids), gen(ids)
    assert s1.shape == (5, 784) and set(s1.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(s1, s2)  # a fresh sample per call (step)
    assert sum(p.numel() for p in make_classifier(784, 8).parameters()) == 784 * 8 + 8 + 72 + 90


def test_unlabelled_dataset_and_missing_run_are_clear_errors(tmp_path, trained_run, data_dir,
                                                             monkeypatch, capsys):
    monkeypatch.setenv("EXVAE_DATA_DIR", str(data_dir))
    assert main([str(tmp_path / "no_run"), f"train.run_dir={tmp_path}"]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert main([str(trained_run), "data.name=binarized_mnist", "augment.epochs=1"]) == 2
    assert "augmentation is defined for mnist, fashion_mnist" in capsys.readouterr().err
