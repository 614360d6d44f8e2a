"""Entry point: builds the parser from the command modules and turns errors into messages.

Convention for every command: figures are printed for people; with ``--json`` the last line
of output is one JSON object holding those figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Callable

from dundi.errors import DundiError

# Modules that contribute subcommands; each defines ``register(subparsers)``.
COMMAND_MODULES = ["dundi.cli.core_cmds", "dundi.cli.cluster_cmds", "dundi.cli.serve_cmds",
                   "dundi.cli.evaluate_cmds"]


def emit(figures: dict[str, Any], as_json: bool, title: str | None = None) -> None:
    """Print figures for people, or as a single JSON line last."""
    if as_json:
        print(json.dumps(figures, default=str))
        return
    if title:
        print(title)
    for key, value in figures.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        print(f"  {key}: {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dundi", description="DunDi: robust classification by "
                                     "distance metric learning (triplet network + two-step oracle classifier).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that group of commands is not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int | None] = args.handler
    try:
        return int(handler(args) or 0)
    except DundiError as exc:
        print(f"dundi: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dundi: interrupted; finished work is saved and a rerun continues from it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
