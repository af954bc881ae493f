"""Progress bars without a terminal: one plain line per update."""

import io

from exvae_dist.common.progress import progress_bar


def test_without_a_terminal_each_update_is_one_line():
    out = io.StringIO()  # not a tty: a log file, CI, Ray's captured output
    bar = progress_bar(total=4, desc="ingest", stream=out, quiet_interval_s=0)
    for _ in range(4):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert all(line.startswith("ingest:") for line in lines)
    assert [line.split("|")[2].split()[0] for line in lines[:5]] == \
        ["0/4", "1/4", "2/4", "3/4", "4/4"]


def test_without_a_terminal_updates_are_thinned_to_the_quiet_interval():
    out = io.StringIO()
    bar = progress_bar(total=1000, desc="x", stream=out, quiet_interval_s=3600)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert len(out.getvalue().splitlines()) <= 3  # start, (end), close: not 1000
