"""Errors raised by ``dundi.data``; both are ``DundiError`` so the CLI shows them plainly."""

from __future__ import annotations

from dundi.errors import DundiError


class DatasetUnavailable(DundiError):
    """Every source of a dataset failed; the message lists each one, why, and how to fix it."""


class DataFormatError(DundiError):
    """A file in a standard format is corrupt, truncated or not what its name says.

    Raised with the path and the exact mismatch so a user can re-download that one file
    instead of guessing.
    """


class SourceFailed(Exception):
    """One source of a dataset could not deliver it (internal: sources.py collects these).

    The message is one short reason ("npm not found on PATH", "no such directory") that
    ends up as one line of the ``DatasetUnavailable`` message.
    """
