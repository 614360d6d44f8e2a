"""Progress for people and for logs: a tqdm bar on a terminal, plain lines elsewhere.

A bar redraws itself with carriage returns; written to a file or a pipe (a Ray job's log, a
CI log, ``dundi ... > log``) every redraw becomes garbage. So bars are drawn only when the
stream is a terminal. Where a bar is the only sign of progress (evaluation shards), a log
gets one line every few units instead; per-epoch figures are already printed as lines.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any, Callable, Iterable


def on_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where tqdm draws) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any):
    """A tqdm bar that is drawn only when ``enabled`` and stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not (enabled and on_terminal()), **kwargs)


def clock(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss``) for a duration; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class LineProgress:
    """The tqdm ``update``/``close`` interface, printing ``desc: done/total (pct), rate,
    elapsed, left`` every ``every`` units, at least every ``interval`` seconds while units
    arrive, and at the end: readable in a log file, and a long job (hours) still says how it
    is doing every few minutes."""

    def __init__(self, total: int, desc: str, unit: str, every: int | None = None,
                 stream: IO[str] | None = None, interval: float = 300.0,
                 now: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every = every or max(1, math.ceil(total / 20))  # about 20 lines per run
        self.stream = stream
        self.interval = interval
        self.done = 0
        self._now = now
        self._last_printed = 0
        self._t0 = self._last_time = now()

    def update(self, n: int = 1) -> None:
        self.done += n
        if (self.done - self._last_printed >= self.every or self.done >= self.total
                or self._now() - self._last_time >= self.interval):
            self._print()

    def _print(self) -> None:
        self._last_printed, self._last_time = self.done, self._now()
        elapsed = self._last_time - self._t0
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct:.0f}%), {rate:.3g} {self.unit}s/s, "
              f"{clock(elapsed)} elapsed, ~{clock(left)} left", file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        if self.done != self._last_printed:
            self._print()


def counter(total: int, desc: str, unit: str, enabled: bool = True):
    """Progress over ``total`` units: a bar on a terminal, else lines (or nothing if disabled)."""
    if enabled and not on_terminal():
        return LineProgress(total, desc, unit)
    # tqdm shows the rate and the time left ({rate_fmt}, {remaining}) on the bar itself
    return bar(total=total, desc=desc, unit=unit, enabled=enabled, dynamic_ncols=True, unit_scale=False)
