"""The one exception type users see: a message that names the problem and what to do."""


class DundiError(Exception):
    """A user-facing error. The CLI prints its message (no stack trace) and exits 2."""
