"""Ray job entrypoint: dundi evaluate ARGS (adversarial evaluation).

Run by `dundi submit` (or `ray job submit --working-dir . -- python jobs/evaluate.py ...`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working_dir copy of dundi

from dundi.cli.job_command import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main(["evaluate", *sys.argv[1:]]))
