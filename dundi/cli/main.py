"""Entry point: builds the parser from the command modules and turns errors into messages.

Convention for every command: figures are printed for people; with ``--json`` the last line
of output is one JSON object holding those figures. Every mistake a user makes, in the
arguments or later, is one line on stderr (``dundi: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable, NoReturn

from dundi.errors import DundiError

PROG = "dundi"

# Modules that contribute subcommands; each defines ``register(subparsers)``.
COMMAND_MODULES = ["dundi.cli.pipeline_cmds", "dundi.cli.cluster_cmds", "dundi.cli.serve_cmds",
                   "dundi.cli.evaluate_cmds"]


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), so `dundi --version` can never
    disagree with what pip installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dundi")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed: pip install -e .)"


class VersionAction(argparse.Action):
    """``--version``: looks the version up only when asked (importlib.metadata is slow to
    import, and every other invocation builds the same parser)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"{PROG} {package_version()}")
        parser.exit()


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: %(default)s)`` to every option's help that does not already say its
    default, so the default shown is always the one the parser uses. Options whose default is
    None must say in words what happens without them (the parser test checks this)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or not action.option_strings or action.default is None
                or action.default is argparse.SUPPRESS or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a usage mistake prints ``dundi: error: ...`` and where
    to read the usage, on one line, and exits 2 — the same shape as every other error, so
    logs and scripts never have to parse argparse's multi-line usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(2, f"{PROG}: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="DunDi: robust classification by "
                    "distance metric learning (triplet network + two-step oracle classifier).")
    parser.add_argument("--version", action=VersionAction, help="print the installed version and exit")
    parser.set_defaults(command_parser=parser)  # `dundi submit` checks commands with this parser
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
