"""Waiting in tests on a condition, never for a guessed time: ``wait_until`` polls and fails,
naming what it waited for, once its deadline passes."""

from __future__ import annotations

import time
from typing import Callable


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    """Returns as soon as ``condition()`` holds; fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {what}"
        time.sleep(0.01)
