"""Progress bars only on a terminal; a log gets plain lines instead of carriage-return redraws."""

from __future__ import annotations

import io
import os

from dundi.progress import LineProgress, bar, counter, on_terminal


def test_terminal_detection():
    assert not on_terminal(io.StringIO())
    main, child = os.openpty()
    with os.fdopen(child, "w") as tty:
        assert on_terminal(tty)
    os.close(main)


def test_bars_are_off_when_stderr_is_not_a_terminal(capsys):
    # under pytest stderr is captured, as in a log file
    assert bar(range(3), enabled=True).disable
    assert isinstance(counter(10, "shards", "shard"), LineProgress)
    assert counter(10, "shards", "shard", enabled=False).disable  # --no-progress: nothing at all


def test_line_progress_prints_plain_lines_every_n_units():
    out = io.StringIO()
    progress = LineProgress(45, "shards", "shard", every=10, stream=out)
    for _ in range(45):
        progress.update(1)
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(":")[1].split()[0] for line in lines] == ["10/45", "20/45", "30/45", "40/45", "45/45"]
    assert lines[-1].startswith("shards: 45/45 shards (100%)")


def test_line_progress_default_interval_keeps_logs_short():
    out = io.StringIO()
    progress = LineProgress(1000, "shards", "shard", stream=out)
    for _ in range(1000):
        progress.update()
    progress.close()
    assert len(out.getvalue().splitlines()) == 20
