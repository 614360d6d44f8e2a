"""What a jobs/*.py entrypoint runs on the cluster: a dundi command, with a header line naming
the job and the cluster (the command itself was checked by :mod:`dundi.cli.submission`)."""

from __future__ import annotations

import os
import shlex

from dundi.cli.main import main


def job_main(argv: list[str]) -> int:
    """What a jobs/*.py entrypoint runs on the cluster: the dundi command, with a header."""
    where = os.environ.get("RAY_ADDRESS", "(no RAY_ADDRESS)")
    job = os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID") or "-"
    print(f"[dundi job {job}] dundi {shlex.join(argv)}  (cluster {where}, cwd {os.getcwd()})",
          flush=True)
    return main(argv)
