"""Strict JSON for everything a run writes (summary.json, fingerprints, run records).

Python's `json` writes NaN and Infinity by default, which no other JSON reader accepts
(`jq`, JavaScript, most JSON libraries). Here a non-finite float becomes null, numpy scalars
and arrays become numbers and lists, paths become strings, and `allow_nan=False` makes sure
nothing slips through. Files are written through a temporary name and renamed, so a crash
never leaves half a file.

    write_json(run / "summary.json", summary)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def strict(obj: Any) -> Any:
    """`obj` with every value JSON can hold: non-finite floats -> None, numpy -> Python,
    tuples -> lists, paths and other objects -> str. Dict keys become strings."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist):
        return strict(tolist())
    return str(obj)


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of `obj` (see `strict`)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to `path` through a temp file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Writes strict JSON to `path` atomically (`write_text_atomic`)."""
    return write_text_atomic(path, dumps(obj) + "\n")


def write_jsonl(path: str | os.PathLike, records: list) -> Path:
    """Writes strict JSON lines, one record each, to `path` atomically."""
    return write_text_atomic(path, "".join(dumps(r, indent=None) + "\n" for r in records))


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file, refusing NaN / Infinity (which strict writers never produce)."""

    def refuse(token: str):
        raise ValueError(f"{path} contains {token}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)
