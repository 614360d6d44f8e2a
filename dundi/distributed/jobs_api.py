"""Long DunDi commands as Ray Jobs: submit, follow, status, logs, stop, list.

``submit(["train", "--workers", "2", ...], address)`` checks the command with DunDi's own
parser, uploads the project as the job's ``working_dir`` and runs the matching thin
entrypoint in ``jobs/`` (``jobs/train.py`` for ``train``, ``jobs/run.py`` for any other
command) on the cluster. The job's driver joins the cluster through ``RAY_ADDRESS``, so
``--workers`` inside a job trains on the whole cluster.

Paths in a job resolve on the cluster, inside the job's unpacked working directory. For a
cluster on this machine relative ``--out``/``--data-dir``/... paths are made absolute (and
``train`` gets an explicit ``--out``) so results land where the user expects them; for a
remote cluster give paths on storage the cluster shares.
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

from dundi.errors import DundiError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
HTTP_TIMEOUT_S = 5.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Dedicated entrypoints (jobs/<file>) for these commands; anything else goes through jobs/run.py.
ENTRYPOINTS = {("train",): "jobs/train.py", ("train-native",): "jobs/train_native.py",
               ("index", "build"): "jobs/index_build.py", ("evaluate",): "jobs/evaluate.py"}
PATH_FLAGS = ("--out", "--data-dir", "--storage", "--pretrained", "--results", "--run", "--report")
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


def _absolute(value: str) -> str:
    return value if "://" in value else str(Path(value).expanduser().resolve())


def check_command(argv: list[str]):
    """Parse a dundi command line with the real parser; DundiError instead of an exit."""
    from dundi.cli.main import build_parser

    if not argv:
        raise DundiError("nothing to submit: give a dundi command, e.g. "
                         "`dundi submit -- train --dataset mnist-10k --workers 2`")
    if argv[0] in ("submit", "jobs"):
        raise DundiError(f"`dundi {argv[0]}` runs on your machine; it cannot itself be submitted")
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        raise DundiError(f"`dundi {shlex.join(argv)}` is not a valid command "
                         f"(the parser's message is above; see `dundi {argv[0]} --help`)") from None


def _command_words(argv: list[str]) -> int:
    """How many leading words name the command (1 for `train`, 2 for `index build`)."""
    import argparse

    from dundi.cli.main import build_parser

    parser, n = build_parser(), 0
    while n < len(argv):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or argv[n] not in subs[0].choices:
            break
        parser, n = subs[0].choices[argv[n]], n + 1
    return n


def prepare_command(argv: list[str], local: bool, warn: Callable[[str], None] = print) -> list[str]:
    """Validate the command and make its paths mean on the cluster what they mean here.

    For a cluster on this machine: path flags (and positional arguments naming existing
    files) become absolute, and ``train``/``train-native`` get an explicit ``--out``. For a
    remote cluster relative paths are left alone with a warning.
    """
    args = check_command(argv)
    argv = list(argv)
    words = _command_words(argv)
    relative = []
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=")
        if flag in PATH_FLAGS and eq:
            if not Path(value).is_absolute() and "://" not in value:
                relative.append(flag)
                if local:
                    argv[i] = f"{flag}={_absolute(value)}"
        elif token in PATH_FLAGS and i + 1 < len(argv):
            value = argv[i + 1]
            if not Path(value).is_absolute() and "://" not in value:
                relative.append(token)
                if local:
                    argv[i + 1] = _absolute(value)
        elif local and i >= words and not token.startswith("-") and not argv[i - 1].startswith("-") \
                and not Path(token).is_absolute() and Path(token).exists():
            argv[i] = _absolute(token)  # a positional path, e.g. `index build runs/x`
    if argv[0] in ("train", "train-native") and getattr(args, "out", None) is None:
        from dundi.cli.core_cmds import config_from_args, default_out

        cfg = config_from_args(args)
        label = "native" if argv[0] == "train-native" else (
            "dundi-P" if getattr(args, "pretrained", None) else "dundi-R")
        out = default_out(cfg, label)
        if local:
            argv += ["--out", _absolute(str(out))]
        else:
            relative.append(f"--out (default {out})")
    if relative and not local:
        warn(f"note: {', '.join(relative)} are relative paths: on the cluster they resolve inside "
             f"the job's temporary working directory; use paths on storage the cluster shares")
    return argv


def submit(argv: list[str], address: str | None = None, *, job_id: str | None = None,
           python: str | None = None, num_cpus: float | None = None, num_gpus: float | None = None,
           env: dict[str, str] | None = None, working_dir: str | None = None,
           warn: Callable[[str], None] = print) -> str:
    """Submit a dundi command as a Ray job; returns the job id."""
    from dundi.distributed.ray_init import is_local_address

    url = dashboard_address(address)
    local = is_local_address(url)
    argv = prepare_command(argv, local, warn)
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


# ----------------------------------------------------------------------------- on the cluster


def job_main(argv: list[str]) -> int:
    """What a jobs/*.py entrypoint runs on the cluster: the dundi command, with a header."""
    from dundi.cli.main import main

    where = os.environ.get("RAY_ADDRESS", "(no RAY_ADDRESS)")
    job = os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID") or "-"
    print(f"[dundi job {job}] dundi {shlex.join(argv)}  (cluster {where}, cwd {os.getcwd()})",
          flush=True)
    return main(argv)
