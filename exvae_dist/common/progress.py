"""Progress bars that suit where the output goes.

On a terminal, tqdm draws in place. Without one (a log file, CI, Ray's captured output) a
redraw is a carriage return that log readers show as another line each time (every update
three times plus a blank line on Ray): there each update is written as one plain line, at
most once every `quiet_interval_s` seconds (and the last one).

    bar = progress_bar(total=n, unit="img", desc="ingest")
"""

from __future__ import annotations

import sys
from typing import Any

QUIET_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns each redraw into one line (carriage returns and the blank
    redraw that clears a bar dropped)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Any = None, *, quiet_interval_s: float = QUIET_INTERVAL_S,
                 stream=None, **kwargs):
    """tqdm(iterable, **kwargs) drawn in place on a terminal, else one line per update."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        kwargs.setdefault("mininterval", quiet_interval_s)
        kwargs.setdefault("maxinterval", max(quiet_interval_s, 10.0))
        kwargs["file"] = _Lines(stream)
        kwargs["dynamic_ncols"] = False
        kwargs.setdefault("ncols", 100)
    else:
        kwargs["file"] = stream
        kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


__all__ = ["progress_bar"]
