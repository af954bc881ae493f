"""Strict JSON: what runs write is JSON every reader accepts (no NaN / Infinity)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from exvae_dist.common.jsonio import dumps, read_json, write_json


def test_non_finite_numbers_become_null_and_numpy_becomes_plain(tmp_path):
    summary = {"val_elbo": float("nan"), "best": -math.inf, "ok": 1.5, "n": np.int64(3),
               "x": np.float32(0.25), "bad32": np.float32("nan"), "ks": (3, 5),
               "means": np.array([1.0, np.inf]), "path": Path("/r"), 7: True, "none": None}
    path = write_json(tmp_path / "summary.json", summary)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    # a strict parser (no NaN / Infinity constants) reads it back
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}"))
    assert back == {"val_elbo": None, "best": None, "ok": 1.5, "n": 3, "x": 0.25, "bad32": None,
                    "ks": [3, 5], "means": [1.0, None], "path": "/r", "7": True, "none": None}
    assert read_json(path) == back
    assert not [p for p in tmp_path.iterdir() if p.name != "summary.json"]  # no temp left


def test_read_json_refuses_what_python_json_would_let_through(tmp_path):
    (tmp_path / "old.json").write_text('{"loss": NaN}')
    with pytest.raises(ValueError, match="NaN"):
        read_json(tmp_path / "old.json")
    assert dumps({"a": float("inf")}, indent=None) == '{"a": null}'
