"""The parser half of the CLI: built without torch or Ray, its defaults read from the settings'
own declarations, and every handler it names importable (docs/ARCHITECTURE.md, "The command
line")."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

from dundi.cli.main import build_parser

DUNDI = Path(sys.executable).with_name("dundi")  # the console script installed beside python
HEAVY = ("torch", "ray", "faiss", "numpy")


def _leaves(parser: argparse.ArgumentParser, prog: str = "dundi"):
    """Every command that runs (name, parser), subcommands included."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prog, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, f"{prog} {name}")


def _heavy_modules_after(code: str) -> tuple[str, str]:
    """Run ``code`` in a fresh interpreter; returns what it printed and, as its last line, the
    heavy modules it left loaded."""
    code += f"\nimport sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    printed, _, loaded = out.stdout.rstrip().rpartition("\n")
    return printed, loaded


def test_building_the_whole_parser_imports_no_torch_or_ray():
    """A fresh interpreter builds the parser, formats every command's help and parses a
    command line: torch, Ray, FAISS and numpy stay unloaded."""
    _, loaded = _heavy_modules_after(
        "import argparse\n"
        "from dundi.cli.main import build_parser\n"
        "def walk(p):\n"
        "    p.format_help()\n"
        "    for a in p._actions:\n"
        "        if isinstance(a, argparse._SubParsersAction):\n"
        "            for s in a.choices.values(): walk(s)\n"
        "parser = build_parser(); walk(parser)\n"
        "parser.parse_args(['train', '--epochs', '2']); parser.parse_args(['evaluate', 'R', '--out', 'o'])\n")
    assert loaded == "[]", loaded


def test_dundi_help_imports_no_torch_or_ray():
    """`dundi --help` as the installed console script runs it, in a fresh interpreter: the
    help is printed, exit 0, and torch, Ray, FAISS and numpy stay unloaded."""
    printed, loaded = _heavy_modules_after(
        "import runpy, sys\n"
        f"sys.argv = [{str(DUNDI)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(DUNDI)!r}, run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "else:\n"
        "    raise AssertionError('--help did not exit')\n")
    assert printed.startswith("usage: dundi") and "COMMAND" in printed
    assert loaded == "[]", loaded


def test_every_handler_the_parser_names_exists():
    """Handlers are named by module and function and imported only when their command runs:
    each name must resolve to a function of a cli handler module."""
    leaves = dict(_leaves(build_parser()))
    assert {"dundi train", "dundi index add", "dundi serve", "dundi evaluate", "dundi jobs stop"} <= set(leaves)
    for name, parser in leaves.items():
        ref = parser._defaults["handler"]
        module, _, function = ref.__qualname__.rpartition(".")
        assert module.startswith("dundi.cli.") and module.endswith("_handlers"), (name, module)
        assert callable(getattr(importlib.import_module(module), function)), name


def test_train_flags_show_the_config_s_own_defaults():
    """A train flag either shows TrainConfig's default or leaves it to the config (None)."""
    from dundi.training.config import TrainConfig

    config = dataclasses.asdict(TrainConfig())
    for command in ("train", "train-native"):
        args = vars(build_parser().parse_args([command]))
        shown = {k: v for k, v in args.items() if k in config}
        assert len(shown) >= 20, sorted(shown)
        wrong = {k: (v, config[k]) for k, v in shown.items() if v is not None and v != config[k]}
        assert not wrong, f"`dundi {command}` defaults that are not TrainConfig's: {wrong}"


def test_evaluate_flags_show_the_config_s_own_defaults():
    from dundi.evaluation.config import EvalConfig

    config = dataclasses.asdict(EvalConfig(run="R"))
    args = vars(build_parser().parse_args(["evaluate", "R", "--out", "o"]))
    args["threats"] = args.pop("threat")  # the flag is singular, the setting plural
    shown = {k: v for k, v in args.items() if k in config and k != "attacks"}  # attacks: "paper", an alias
    assert len(shown) >= 12, sorted(shown)
    wrong = {k: (v, config[k]) for k, v in shown.items() if v is not None and v != config[k]}
    assert not wrong, f"`dundi evaluate` defaults that are not EvalConfig's: {wrong}"


def test_choices_are_the_declared_values():
    """--model, --loss, --dataset, --format, --oracle-kind offer exactly what their owners declare."""
    from dundi.data.specs import DATASETS
    from dundi.nets.models import BUILDERS
    from dundi.rule.params import METRICS
    from dundi.run.names import ORACLE_KINDS
    from dundi.serving.settings import ANSWER_FORMATS
    from dundi.training.config import LOSSES

    leaves = dict(_leaves(build_parser()))

    def choices(command: str, flag: str) -> tuple:
        return tuple(next(a for a in leaves[command]._actions
                          if flag in a.option_strings or a.dest == flag).choices)

    assert choices("dundi train", "--model") == tuple(BUILDERS)
    assert choices("dundi train", "--loss") == LOSSES and choices("dundi train", "--metric") == METRICS
    assert choices("dundi data fetch", "dataset") == choices("dundi index add", "--dataset") == tuple(DATASETS)
    assert choices("dundi classify", "--format") == ANSWER_FORMATS
    assert choices("dundi index build", "--oracle-kind") == ORACLE_KINDS


def test_each_backbone_name_builds_its_own_network():
    """nets.models pairs the names of nets.names with builders by position: a reordered name
    must not silently build another network."""
    from dundi.nets.models import BUILDERS

    assert {name: f.__name__ for name, f in BUILDERS.items()} == {
        name: "_" + name.replace("-", "_") for name in BUILDERS}
