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
from typing import IO, Any, Iterable


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


class LineProgress:
    """The tqdm ``update``/``close`` interface, printing ``desc: done/total (pct), elapsed,
    left`` every ``every`` units and at the end: readable in a log file."""

    def __init__(self, total: int, desc: str, unit: str, every: int | None = None,
                 stream: IO[str] | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every = every or max(1, math.ceil(total / 20))  # about 20 lines per run
        self.stream = stream
        self.done = 0
        self._last_printed = 0
        self._t0 = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done - self._last_printed >= self.every or self.done >= self.total:
            self._print()

    def _print(self) -> None:
        self._last_printed = self.done
        elapsed = time.perf_counter() - self._t0
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct:.0f}%), {elapsed:.0f} s elapsed, "
              f"~{left:.0f} s left", file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        if self.done != self._last_printed:
            self._print()


def counter(total: int, desc: str, unit: str, enabled: bool = True):
    """Progress over ``total`` units: a bar on a terminal, else lines (or nothing if disabled)."""
    if enabled and not on_terminal():
        return LineProgress(total, desc, unit)
    return bar(total=total, desc=desc, unit=unit, enabled=enabled, dynamic_ncols=True)
