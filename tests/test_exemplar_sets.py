"""Growing an exemplar set, attribution weights, generation with recorded sources, and the
three commands end to end on a tiny trained run."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from exvae_dist import config as config_mod
from exvae_dist.data import DataSplits
from exvae_dist.evaluation.runs import TrainedRun
from exvae_dist.evaluation.exemplar_sets import ExemplarSetError, add_exemplars, choose_set, list_versions, read_version, sets_dir
from exvae_dist.evaluation.attribution import attribution_weights, memorisation_check, summarize
from exvae_dist.evaluation.generation import generate
from exvae_dist.core.objective import build_model, encode_means

SHAPE = (1, 4, 4)
D = 16


def _tiny(tmp_path, prior="exemplar", log_var=-2.0, n_train=40, seed=0):
    cfg = config_mod.load(None, ["model.hidden=16", "model.z_dim=3", f"prior.kind={prior}",
                                 "prior.n_pseudo=5"])
    torch.manual_seed(seed)
    model = build_model(cfg, SHAPE).eval()
    if prior == "exemplar":
        model.prior.log_var.data.fill_(log_var)
    g = np.random.default_rng(seed)
    # grey levels OFF the 8-bit grid: re-encoding stored (uint8) images would move latents
    train_x = g.random((n_train, D)).astype(np.float32)
    splits = DataSplits(name="tiny", train_x=train_x, train_y=np.arange(n_train) % 3,
                        valid_x=train_x[:5], valid_y=None, test_x=(g.random((8, D)) > 0.5)
                        .astype(np.float32), test_y=None, image_shape=SHAPE, dynamic=True)
    run = TrainedRun(path=tmp_path, checkpoint=tmp_path / "best.pt", cfg=cfg, model=model,
                     image_shape=SHAPE, epoch=1)
    return run, splits


def _short_run(tmp_path, data_dir, *overrides):
    """A one-epoch smoke run trained into tmp_path; returns its config."""
    from exvae_dist.train.local import fit

    cfg = config_mod.load("smoke", [f"train.run_dir={tmp_path}", "train.epochs=1",
                                    "train.progress=false", "train.threads=1", "data.n_valid=50",
                                    "data.n_test=40", "tracking.sample_grid=false",
                                    "tracking.enabled=false", *overrides],
                          env={"EXVAE_DATA_DIR": str(data_dir)})
    fit(cfg)
    return cfg


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_adding_exemplars_never_changes_the_old_versions_latents(tmp_path):
    run, splits = _tiny(tmp_path)
    g = np.random.default_rng(1)
    new1 = g.random((25, D)).astype(np.float32)
    assert add_exemplars(run, new1, np.full(25, 7), "batch 1", splits) == 2
    v1, v2 = read_version(tmp_path, 1), read_version(tmp_path, 2)
    before = {v: _digest(sets_dir(tmp_path) / f"v{v:06d}") for v in (1, 2)}
    # v1 = the training set as training encodes it; v2 = v1 bitwise + the new images encoded
    want1 = encode_means(run.model.net, torch.from_numpy(splits.train_x)).numpy()
    np.testing.assert_allclose(v1.latents, want1, rtol=0, atol=1e-6)
    assert np.array_equal(v2.latents[:40], v1.latents)
    np.testing.assert_allclose(v2.latents[40:], encode_means(run.model.net,
                               torch.from_numpy(new1)).numpy(), rtol=0, atol=1e-6)
    assert v2.labels.tolist() == (np.arange(40) % 3).tolist() + [7] * 25

    assert add_exemplars(run, g.random((10, D)).astype(np.float32), np.full(10, 8),
                         "batch 2", splits) == 3
    v3 = read_version(tmp_path, 3)
    assert np.array_equal(v3.latents[:65], v2.latents)  # bitwise: nothing was re-encoded
    # the files of the old versions are byte-for-byte what they were
    assert {v: _digest(sets_dir(tmp_path) / f"v{v:06d}") for v in (1, 2)} == before
    assert list_versions(tmp_path) == [1, 2, 3]
    assert not list(sets_dir(tmp_path).glob(".*tmp*"))
    # the default is the newest version; original and a number point back
    assert choose_set(run, splits).version == 3
    assert choose_set(run, splits, "original").version == 0
    assert len(choose_set(run, splits, "2").images) == 65
    with pytest.raises(ExemplarSetError, match="no exemplar set version 9"):
        choose_set(run, splits, "9")


def test_images_already_in_the_set_are_skipped_and_all_of_them_refused(tmp_path):
    run, splits = _tiny(tmp_path)
    new = np.random.default_rng(2).random((6, D)).astype(np.float32)
    images = np.concatenate([splits.train_x[:4], new, splits.train_x[10:11], new[2:3]])
    assert add_exemplars(run, images, np.arange(12), "mixed", splits) == 2
    v2 = read_version(tmp_path, 2)  # the training rows and the repeat of new[2] skipped
    assert len(v2.images) == 40 + 6 and v2.labels[40:].tolist() == [4, 5, 6, 7, 8, 9]
    with pytest.raises(ExemplarSetError, match="already exemplars of v2: nothing to add"):
        add_exemplars(run, new[:3], np.zeros(3), "again", splits)


def test_a_gaussian_prior_refuses_to_grow(tmp_path):
    run, splits = _tiny(tmp_path, prior="gaussian")
    with pytest.raises(ExemplarSetError, match="only the exemplar prior"):
        add_exemplars(run, splits.train_x[:3], np.zeros(3), "x", splits)


def test_attribution_weights_sum_to_one_and_match_brute_force(tmp_path):
    run, splits = _tiny(tmp_path, log_var=-1.3)
    model = run.model
    x = torch.from_numpy(splits.test_x[:3])
    centres = encode_means(model.net, torch.from_numpy(splits.train_x)).double()
    S = 50
    w = attribution_weights(model, x, centres, S, torch.Generator().manual_seed(5),
                            sample_chunk=S)
    assert w.shape == (3, 40)
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0, atol=1e-12)
    # brute force: the same posterior draws, every exemplar's full Gaussian density (scipy)
    gen = torch.Generator().manual_seed(5)
    mean, logvar = (t.detach().double().numpy() for t in model.net.encode_top(x))
    s2 = np.exp(model.prior.log_var.item())  # the float32 parameter, as the model holds it
    for b in range(3):
        eps = torch.randn(S, 3, generator=gen, dtype=torch.float64).numpy()
        z = mean[b] + np.exp(0.5 * logvar[b]) * eps
        logp = np.stack([multivariate_normal(c, s2 * np.eye(3)).logpdf(z)
                         for c in centres.numpy()], axis=1)  # [S, N]
        want = np.exp(logp - logsumexp(logp, axis=1, keepdims=True)).mean(0)
        np.testing.assert_allclose(w[b].numpy(), want, rtol=1e-9, atol=1e-12)
    rows = summarize(w, 4, splits.train_y, sources=np.array([2, -1, 0]))
    assert rows[0]["top_exemplars"] == np.argsort(-w[0].numpy())[:4].tolist()
    assert rows[0]["source_rank"] >= 1 and "source_exemplar" not in rows[1]
    json.dumps(rows, allow_nan=False)


def test_a_generated_samples_recorded_exemplar_is_the_one_it_was_drawn_from(tmp_path):
    # a tiny kernel (s = e^-10): each sample decodes its own exemplar's mean and no other's
    run, splits = _tiny(tmp_path, log_var=-20.0)
    model = run.model
    ex = choose_set(run, splits)
    out = generate(model, ex, 60, seed=3, progress=False)
    ids = out["exemplar_ids"]
    assert len(set(ids.tolist())) > 10  # uniform over exemplars, not one
    expected = model.net.decode_top(torch.from_numpy(ex.latents)).detach().numpy()  # [N, D]
    d = ((out["images"][:, None, :] - expected[None]) ** 2).sum(-1)  # [n, N]
    assert (d.argmin(1) == ids).all()
    np.testing.assert_allclose(out["images"], expected[ids], atol=1e-4)
    assert (out["labels"] == splits.train_y[ids]).all()
    # the same seed gives the same draws; conditioning uses the ids in turn
    assert np.array_equal(generate(model, ex, 60, seed=3, progress=False)["exemplar_ids"], ids)
    cond = generate(model, ex, 7, exemplar_ids=[4, 9], seed=0, progress=False)
    assert cond["exemplar_ids"].tolist() == [4, 9, 4, 9, 4, 9, 4]
    np.testing.assert_allclose(cond["images"], expected[cond["exemplar_ids"]], atol=1e-4)
    with pytest.raises(ValueError, match="0..39"):
        generate(model, ex, 3, exemplar_ids=[40], progress=False)


def test_memorisation_check_flags_copies():
    g = np.random.default_rng(0)
    train = g.random((200, D))
    test = g.random((50, D))
    copies = train[:50] + 1e-3
    numbers, dist = memorisation_check(copies, train, test, sources=np.arange(50))
    assert numbers["generated_below_test_p01"] == 1.0 and numbers["ratio_of_medians"] < 0.01
    assert numbers["nearest_is_source_exemplar"] == 1.0
    fresh, _ = memorisation_check(g.random((50, D)), train, test)
    assert 0.5 < fresh["ratio_of_medians"] < 2.0


@pytest.mark.slow
def test_grow_generate_explain_evaluate_commands(tmp_path, data_dir, monkeypatch, capsys):
    from exvae_dist.commands import evaluate, exemplars, explain
    from exvae_dist.commands import generate as generate_mod

    monkeypatch.setenv("EXVAE_DATA_DIR", str(data_dir))
    cfg = _short_run(tmp_path, data_dir, "train.max_steps_per_epoch=3", "data.n_train=300",
                     "data.labels=[0,1,2,3,4]")
    run = str(cfg.run_path())
    assert exemplars.main(["add", run, "mnist:train:5-9", "--n", "120"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2
    assert exemplars.main(["add", run, "mnist:nope"]) == 2
    assert "DATASET:SPLIT" in capsys.readouterr().err
    assert exemplars.main(["add", run, "mnist:test"]) == 2  # evaluate's own test images
    assert "is a test split" in capsys.readouterr().err
    out = tmp_path / "gen.npz"
    assert generate_mod.main([run, "--n", "30", "--out", str(out), "--grid",
                              str(tmp_path / "g.png")]) == 0
    with np.load(out) as f:
        assert f["images"].shape == (30, 1, 28, 28) and f["images"].dtype == np.uint8
        ids, labels = f["exemplar_ids"], f["labels"]
    v2 = read_version(cfg.run_path(), 2)
    assert (labels == v2.labels[ids]).all() and ids.max() < 420
    assert (tmp_path / "g.png").is_file()
    assert explain.main([run, "--images", str(out), "--top", "3", "--samples", "10",
                         "--memorisation", "20"]) == 0
    ex = cfg.run_path() / "explain"
    att = json.loads((ex / "attributions.json").read_text())
    assert len(att["per_image"]) == 30 and (ex / "attributions.png").is_file()
    assert abs(att["per_image"][0]["weight_sum"] - 1) < 1e-9
    assert att["per_image"][0]["source_exemplar"] == int(ids[0])
    assert (ex / "memorisation.png").is_file()
    assert json.loads((ex / "memorisation.json").read_text())["n_generated"] == 20
    capsys.readouterr()
    common = ["eval.n_samples=10", "eval.n_test=5", "eval.knn=false", "eval.pictures=false",
              "tracking.enabled=false", "eval.test_labels=[5,6,7,8,9]"]
    assert evaluate.main([run, *common]) == 0
    grown = json.loads(capsys.readouterr().out)
    assert evaluate.main([run, *common, "eval.exemplars=original"]) == 0
    original = json.loads(capsys.readouterr().out)
    assert grown["exemplars"].startswith("v1 (300) + the first 120 of") and "300 training" in original["exemplars"]
    assert np.isfinite(grown["log_likelihood"]["bits_per_dim"])


def test_explain_on_a_run_without_exemplars_says_what_applies(tmp_path, data_dir, monkeypatch,
                                                              capsys):
    from exvae_dist.commands import explain

    monkeypatch.setenv("EXVAE_DATA_DIR", str(data_dir))
    cfg = _short_run(tmp_path, data_dir, "train.max_steps_per_epoch=2", "data.n_train=200",
                     "prior.kind=gaussian")
    assert explain.main([str(cfg.run_path())]) == 2
    assert "has a gaussian prior: attributions need an exemplar-prior run" in \
        capsys.readouterr().err
    assert not (cfg.run_path() / "explain").exists()
