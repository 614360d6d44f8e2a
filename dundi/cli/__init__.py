"""The ``dundi`` command (Ray edge). Each ``*_cmds`` module registers its own subcommands."""

from dundi.cli.main import main

__all__ = ["main"]
