"""A dundi command line as a Ray job: checked by the CLI's own parser, its paths made to mean on
the cluster what they mean here, then handed to the edge (:mod:`dundi.distributed.jobs_api`).

This lives in the CLI because it *is* the CLI's business: the edge below takes a prepared
command and never imports the parser (imports run one way, down). The parser is handed in
(`dundi submit` passes its own), so this module never imports the one that imports it.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Callable

from dundi.cli.train_config import config_from_args, default_out
from dundi.distributed import jobs_api
from dundi.distributed.ray_init import is_local_address
from dundi.errors import DundiError

PATH_FLAGS = ("--out", "--data-dir", "--storage", "--pretrained", "--results", "--run", "--report")


def check_command(argv: list[str], parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse a dundi command line with the real ``parser`` (``dundi``'s own, handed down by
    `dundi submit`: this module sits below the parser); DundiError instead of an exit."""
    if not argv:
        raise DundiError("nothing to submit: give a dundi command, e.g. "
                         "`dundi submit -- train --dataset mnist-10k --workers 2`")
    if argv[0] in ("submit", "jobs"):
        raise DundiError(f"`dundi {argv[0]}` runs on your machine; it cannot itself be submitted")
    try:
        return parser.parse_args(argv)
    except SystemExit:
        raise DundiError(f"`dundi {shlex.join(argv)}` is not a valid command "
                         f"(the parser's message is above; see `dundi {argv[0]} --help`)") from None


def command_words(argv: list[str], args: argparse.Namespace) -> int:
    """How many leading words name the command: 2 for a group's action (`index build`), else 1.
    A group's parser stores its action in ``<group>_cmd`` (see the CLI's subparsers)."""
    return 2 if getattr(args, f"{argv[0].replace('-', '_')}_cmd", None) else 1


def _absolute(value: str) -> str:
    return value if "://" in value else str(Path(value).expanduser().resolve())


def _relative(value: str) -> bool:
    return not Path(value).is_absolute() and "://" not in value


def prepare_command(argv: list[str], local: bool, parser: argparse.ArgumentParser,
                    warn: Callable[[str], None] = print) -> list[str]:
    """Validate the command and make its paths mean on the cluster what they mean here.

    For a cluster on this machine: path flags (and positional arguments naming existing
    files) become absolute, and ``train``/``train-native`` get an explicit ``--out``. For a
    remote cluster relative paths are left alone with a warning.
    """
    args = check_command(argv, parser)
    argv, words, relative = list(argv), command_words(argv, args), []
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=")
        if flag in PATH_FLAGS and eq and _relative(value):
            relative.append(flag)
            argv[i] = f"{flag}={_absolute(value)}" if local else token
        elif token in PATH_FLAGS and i + 1 < len(argv) and _relative(argv[i + 1]):
            relative.append(token)
            argv[i + 1] = _absolute(argv[i + 1]) if local else argv[i + 1]
        elif local and i >= words and not token.startswith("-") and not argv[i - 1].startswith("-") \
                and _relative(token) and Path(token).exists():
            argv[i] = _absolute(token)  # a positional path, e.g. `index build runs/x`
    if argv[0] in ("train", "train-native") and getattr(args, "out", None) is None:
        out = _default_out(argv[0], args)
        if local:
            argv += ["--out", _absolute(str(out))]
        else:
            relative.append(f"--out (default {out})")
    if relative and not local:
        warn(f"note: {', '.join(relative)} are relative paths: on the cluster they resolve inside "
             f"the job's temporary working directory; use paths on storage the cluster shares")
    return argv


def _default_out(command: str, args: argparse.Namespace) -> Path:
    label = "native" if command == "train-native" else (
        "dundi-P" if getattr(args, "pretrained", None) else "dundi-R")
    return default_out(config_from_args(args), label)


def submit_command(argv: list[str], parser: argparse.ArgumentParser, address: str | None = None,
                   warn: Callable[[str], None] = print, **options) -> str:
    """Check and prepare ``argv`` (:func:`prepare_command`), then submit it; returns the job id."""
    local = is_local_address(jobs_api.dashboard_address(address))
    return jobs_api.submit(prepare_command(argv, local, parser, warn), address, **options)
