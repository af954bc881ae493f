"""Config loading: defaults, YAML, overrides, and errors that name the key."""

import pytest

from exvae_dist import config as config_mod
from exvae_dist.config import ConfigError, load


def test_defaults_are_the_papers_mnist_exemplar_vae():
    cfg = load(None, [], env={})
    assert (cfg.data.name, cfg.model.arch, cfg.prior.kind) == ("mnist", "vae", "exemplar")
    assert (cfg.model.z_dim, cfg.model.hidden, cfg.prior.k, cfg.train.batch_size) == (40, 300, 10, 100)
    assert cfg.train.lr == 5e-4 and cfg.eval.n_samples == 5000 and cfg.train.warmup_epochs == 100


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\nprior:\n  k: 3\n")
    cfg = load(path, ["prior.k=5"], env={})
    assert cfg.train.epochs == 7 and cfg.prior.k == 5


def test_bundled_config_by_name():
    cfg = load("smoke", [], env={})
    assert cfg.data.n_train == 2000 and cfg.train.name == "smoke"


@pytest.mark.parametrize("override, words", [
    (["train.epoch=3"], "train.epoch"),
    (["train.epochs=abc"], "train.epochs"),
    (["prior.kind=bogus"], "prior.kind"),
    (["train.batch_size=0"], "train.batch_size"),
    (["nosuchthing"], "key=value"),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load(None, override, env={})


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  depth: 3\n")
    with pytest.raises(ConfigError, match=r"model\.depth"):
        load(path, [], env={})


def test_missing_config_file_lists_bundled_ones():
    with pytest.raises(ConfigError, match="mnist_vae"):
        load("no_such_config", [], env={})


def test_environment_fills_data_root_only_when_unset():
    assert load(None, [], env={"EXVAE_DATA_DIR": "/d"}).data.root == "/d"
    assert load(None, ["data.root=/x"], env={"EXVAE_DATA_DIR": "/d"}).data.root == "/x"


def test_round_trip_through_dict():
    cfg = load(None, ["prior.k=4", "data.n_train=10"], env={})
    again = config_mod.from_dict(config_mod.to_dict(cfg))
    assert again == cfg
    flat = config_mod.flatten(config_mod.to_dict(cfg))
    assert flat["prior.k"] == 4 and "train.lr" in flat
