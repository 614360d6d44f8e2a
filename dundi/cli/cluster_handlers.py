"""Cluster commands, the handler half (the flags: dundi.cli.cluster_cmds): each talks to a
cluster through the Ray Jobs API (dundi.distributed.jobs_api)."""

from __future__ import annotations

import argparse
import time

from dundi.cli.args import emit
from dundi.cli.submission import submit_command
from dundi.distributed import jobs_api
from dundi.errors import DundiError


def _env_pairs(pairs: list[str] | None) -> dict[str, str]:
    env = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise DundiError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _finish(st: dict, as_json: bool, extra: dict) -> None:
    emit({**extra, **st}, as_json, f"job {st['job_id']} {st['status']}")
    if st["status"] != "SUCCEEDED":
        raise DundiError(f"job {st['job_id']} ended {st['status']}"
                         + (f": {st['message']}" if st.get("message") else ""))


def cmd_submit(args: argparse.Namespace) -> None:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    job_id = submit_command(command, args.command_parser, args.address, job_id=args.job_id, python=args.python,
                            num_cpus=args.num_cpus, num_gpus=args.num_gpus, env=_env_pairs(args.env),
                            working_dir=args.working_dir)
    address = jobs_api.dashboard_address(args.address)
    figures = {"job_id": job_id, "address": address, "command": " ".join(command)}
    if not args.follow:
        emit(figures, args.json, f"submitted job {job_id}\n  follow it: dundi jobs logs {job_id} "
                                 f"--follow --address {address}")
        return
    print(f"submitted job {job_id}; following its logs (Ctrl-C stops following, not the job)",
          flush=True)
    _finish(jobs_api.follow(job_id, args.address), args.json, figures)


def cmd_status(args: argparse.Namespace) -> None:
    st = jobs_api.status(args.job_id, args.address)
    emit(st, args.json, f"job {args.job_id}")


def cmd_logs(args: argparse.Namespace) -> None:
    if args.follow:
        _finish(jobs_api.follow(args.job_id, args.address), args.json, {})
    else:
        print(jobs_api.logs(args.job_id, args.address), end="")


def cmd_stop(args: argparse.Namespace) -> None:
    stopped = jobs_api.stop(args.job_id, args.address)
    st = jobs_api.status(args.job_id, args.address)
    if args.wait:
        deadline = time.monotonic() + args.timeout
        while st["status"] not in jobs_api.TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            st = jobs_api.status(args.job_id, args.address)
    emit({**st, "stop_requested": stopped}, args.json,
         f"job {args.job_id}: {'stop requested' if stopped else 'was not running'}")


def cmd_list(args: argparse.Namespace) -> None:
    rows = jobs_api.list_jobs(args.address)
    if args.json:
        emit({"jobs": rows}, True)
        return
    if not rows:
        print("no jobs")
    for row in rows:
        print(f"{row['job_id']:<36} {row['status']:<10} {row['entrypoint']}")
