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


def test_line_progress_states_rate_and_time_left_and_prints_on_a_timer():
    """A job's log line carries the rate and the time left; a slow job still gets a line
    every ``interval`` seconds although fewer than ``every`` units arrived."""
    now = [0.0]
    out = io.StringIO()
    progress = LineProgress(1000, "eval", "image-attack", every=500, stream=out, interval=60.0,
                            now=lambda: now[0])
    now[0] = 50.0
    progress.update(100)            # 100 in 50 s: not yet 500 units, not yet 60 s: no line
    assert out.getvalue() == ""
    now[0] = 100.0
    progress.update(100)            # 200 in 100 s: the timer prints
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("eval: 200/1000 image-attacks (20%), 2 image-attacks/s")
    assert "1:40 elapsed" in line and "~6:40 left" in line  # 800 left at 2/s = 400 s
    now[0] = 130.0
    progress.update(10)             # 30 s after the last line: quiet
    assert len(out.getvalue().splitlines()) == 1
