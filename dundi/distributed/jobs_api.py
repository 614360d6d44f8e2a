"""Long DunDi commands as Ray Jobs: submit, follow, status, logs, stop, list.

``submit(["train", "--workers", "2", ...], address)`` uploads the project as the job's ``working_dir`` and runs the matching thin
entrypoint in ``jobs/`` (``jobs/train.py`` for ``train``, ``jobs/run.py`` for any other
command) on the cluster. The job's driver joins the cluster through ``RAY_ADDRESS``, so
``--workers`` inside a job trains on the whole cluster.

The command arrives checked and with its paths prepared by the CLI (``dundi submit``, see
:mod:`dundi.cli.job_command`): this edge module never imports the CLI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from dundi.distributed import JOBS_ADDRESS
from dundi.errors import DundiError

DEFAULT_ADDRESS = JOBS_ADDRESS
HTTP_TIMEOUT_S = 5.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Dedicated entrypoints (jobs/<file>) for these commands; anything else goes through jobs/run.py.
ENTRYPOINTS = {("train",): "jobs/train.py", ("train-native",): "jobs/train_native.py",
               ("index", "build"): "jobs/index_build.py", ("evaluate",): "jobs/evaluate.py"}
WORKING_DIR_EXCLUDES = [".venv/", "venv/", ".git/", "runs/", "build/", "dist/", "*.egg-info/",
                        "**/__pycache__/", ".pytest_cache/", "*.parquet", "*.safetensors",
                        "*.faiss", "node_modules/"]
FORWARDED_ENV = ("DUNDI_DATA_DIR",)


# ----------------------------------------------------------------------------- the client


def dashboard_address(address: str | None) -> str:
    """The Jobs API URL: --address, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS, else local."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address or address == "auto":
        return DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    if address.startswith("ray://"):
        raise DundiError(f"--address {address}: the Jobs API is served by the dashboard "
                         f"(http://HEAD:8265), not by Ray Client")
    return address.rstrip("/")


def check_dashboard(address: str, timeout: float = HTTP_TIMEOUT_S) -> None:
    """Raise DundiError unless something answers HTTP at the dashboard address in time."""
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answers (a 401 without a token, say): the client reports the details
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DundiError(f"no Ray Jobs API answers at {address} ({reason}); pass the dashboard "
                         f"address of a running cluster (--address http://HEAD:8265, or "
                         f"$RAY_ADDRESS), or start one with `python cluster/local_cluster.py up`"
                         ) from None


def client(address: str | None = None):
    """A JobSubmissionClient for the cluster, after a quick reachability check."""
    from ray.job_submission import JobSubmissionClient

    from dundi.distributed.ray_init import AUTH_HINT, enable_local_token_auth

    url = dashboard_address(address)
    check_dashboard(url)
    enable_local_token_auth(url)
    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # ConnectionError, RuntimeError, AuthenticationError ...
        hint = f" ({AUTH_HINT})" if "auth" in str(exc).lower() or "401" in str(exc) else ""
        raise DundiError(f"cannot use the Ray Jobs API at {url}: {exc}{hint}") from None


def _call(what: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except DundiError:
        raise
    except Exception as exc:  # the SDK raises RuntimeError with the server's message
        raise DundiError(f"{what}: {exc}") from None


# ----------------------------------------------------------------------------- submission


def project_root() -> Path:
    """The DunDi checkout that becomes the job's working_dir (it holds jobs/)."""
    import dundi

    root = Path(dundi.__file__).resolve().parents[1]
    if not (root / "jobs").is_dir() or not (root / "pyproject.toml").is_file():
        raise DundiError(f"`dundi submit` needs the DunDi project checkout (with jobs/ and "
                         f"pyproject.toml); {root} is not one — run it from a source install")
    return root


def entrypoint_script(argv: list[str]) -> tuple[str, list[str]]:
    """(jobs/<script>.py, the arguments it takes) for a dundi command line."""
    for prefix, script in ENTRYPOINTS.items():
        if tuple(argv[: len(prefix)]) == prefix and (project_root() / script).exists():
            return script, argv[len(prefix):]
    return "jobs/run.py", argv


def submit(argv: list[str], address: str | None = None, *, job_id: str | None = None,
           python: str | None = None, num_cpus: float | None = None, num_gpus: float | None = None,
           env: dict[str, str] | None = None, working_dir: str | None = None) -> str:
    """Submit a dundi command line as a Ray job; returns the job id. The command is taken as
    given: the CLI (``dundi submit``) checks it with its parser and makes its paths absolute
    first (:mod:`dundi.cli.job_command`), so this layer never reaches up into the CLI."""
    from dundi.distributed.ray_init import is_local_address

    url = dashboard_address(address)
    local = is_local_address(url)
    root = Path(working_dir).resolve() if working_dir else project_root()
    script, rest = entrypoint_script(argv)
    # On this machine the job can use this very interpreter (its packages are installed);
    # elsewhere `python` is whatever the cluster's image or setup commands installed.
    python = python or (sys.executable if local else "python")
    env_vars = {"PYTHONUNBUFFERED": "1",
                **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **(env or {})}
    runtime_env = {"working_dir": str(root), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}
    jobs = client(url)
    quiet = logging.getLogger("ray._private.runtime_env")  # one INFO line per packaged file
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _call(f"submitting to {url}", jobs.submit_job,
                     entrypoint=shlex.join([python, script, *rest]), submission_id=job_id,
                     runtime_env=runtime_env, entrypoint_num_cpus=num_cpus,
                     entrypoint_num_gpus=num_gpus, metadata={"dundi_command": shlex.join(argv)[:1000]})
    finally:
        quiet.setLevel(level)


# ----------------------------------------------------------------------------- the rest


def status(job_id: str, address: str | None = None) -> dict:
    info = _call(f"job {job_id}", client(address).get_job_info, job_id)
    return {"job_id": job_id, "status": str(getattr(info.status, "value", info.status)),
            "message": info.message, "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time,
            "driver_exit_code": getattr(info, "driver_exit_code", None)}


def logs(job_id: str, address: str | None = None) -> str:
    return _call(f"logs of job {job_id}", client(address).get_job_logs, job_id)


def follow(job_id: str, address: str | None = None, write: Callable[[str], None] | None = None,
           poll_s: float = 1.0) -> dict:
    """Stream a job's logs until it ends; returns its final status."""
    write = write or (lambda chunk: (sys.stdout.write(chunk), sys.stdout.flush()))
    jobs = client(address)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:  # the stream broke: fall back to polling the status
        write(f"\n[dundi] log stream interrupted ({exc}); waiting for the job to finish\n")
    while (st := status(job_id, address))["status"] not in TERMINAL:
        time.sleep(poll_s)
    return st


def wait(job_id: str, address: str | None = None, timeout: float | None = None,
         poll_s: float = 1.0) -> dict:
    deadline = None if timeout is None else time.monotonic() + timeout
    while (st := status(job_id, address))["status"] not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            raise DundiError(f"job {job_id} is still {st['status']} after {timeout:.0f}s")
        time.sleep(poll_s)
    return st


def stop(job_id: str, address: str | None = None) -> bool:
    return bool(_call(f"stopping job {job_id}", client(address).stop_job, job_id))


def list_jobs(address: str | None = None) -> list[dict]:
    rows = []
    for info in _call("listing jobs", client(address).list_jobs):
        rows.append({"job_id": info.submission_id or info.job_id,
                     "status": str(getattr(info.status, "value", info.status)),
                     "entrypoint": info.entrypoint, "start_time": info.start_time,
                     "end_time": info.end_time})
    return sorted(rows, key=lambda r: r["start_time"] or 0)
