"""The Ray edge: Ray Train jobs, Ray Jobs submission, Ray Serve and Ray task fan-out.

Everything here may import ``ray``; nothing in the core imports this package.
Submodules are imported on demand (``from dundi.distributed.train_job import run_ray_training``)
so that ``import dundi.distributed`` stays cheap.
"""

TRAIN_MAX_FAILURES = 3  # worker failures a Ray Train run recovers from (RayOptions, `--max-failures`)
JOBS_ADDRESS = "http://127.0.0.1:8265"  # Ray's dashboard / Jobs API on this machine: the default cluster
