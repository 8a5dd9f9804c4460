"""Progress renderers: a bar only on a terminal, JSON lines for machines, silence otherwise."""

from __future__ import annotations

import json

from imagetool.progress import Bar, JsonLines, Progress, Silent, renderer


def test_bar_shows_bytes_rate_and_eta(capsys):
    bar = Bar("converting")
    bar(Progress(done=512 << 20, total=1 << 30, elapsed=2.0, output_bytes=100))
    bar(Progress(done=1 << 30, total=1 << 30, elapsed=4.0, output_bytes=200))
    bar.close()
    err = capsys.readouterr().err
    assert "converting" in err and "100%" in err and "1.00G" in err


def test_json_lines_are_one_object_per_update(capsys):
    out = JsonLines()
    out(Progress(done=10, total=100, elapsed=2.0, output_bytes=5))
    line = json.loads(capsys.readouterr().err)
    assert line == {"done": 10, "total": 100, "rate": 5, "eta": 18.0, "elapsed": 2.0, "output_bytes": 5}


def test_auto_is_silent_off_a_terminal():
    assert isinstance(renderer("auto", "x"), Silent)  # pytest's stderr is not a terminal
    assert isinstance(renderer("none", "x"), Silent)
    assert isinstance(renderer("json", "x"), JsonLines)


def test_rate_and_eta():
    p = Progress(done=0, total=100, elapsed=0.0, output_bytes=0)
    assert p.rate == 0.0 and p.eta is None
