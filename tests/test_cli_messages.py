"""Messages a user meets: each names the actual problem and what to do, and every flag's help
says its default. In-process (no subprocess, no training): small untrained runs in tmp dirs."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from dundi.cli.main import DefaultsHelpFormatter, VersionAction, build_parser, main, package_version
from dundi.errors import DundiError
from dundi.nets.models import build_distance_net, build_native
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.run.directory import Run
from dundi.run.storage import save_model, save_oracle

SHAPE = (1, 28, 28)


def _native(path: Path) -> Path:
    torch.manual_seed(0)
    save_model(path, build_native("lenet1", SHAPE, 10),
               {"kind": "native", "arch": "lenet1", "dataset": "mnist-10k", "in_shape": list(SHAPE),
                "num_classes": 10, "config": {}})
    return path


def _dundi(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_distance_net("lenet5", SHAPE, 16)
    save_model(path, model, {"kind": "dundi", "arch": "lenet5", "dataset": "mnist-10k",
                             "in_shape": list(SHAPE), "num_classes": 10, "embed_dim": 16, "mode": "R",
                             "config": {}})
    with torch.no_grad():
        emb = model.eval()(torch.rand(20, *SHAPE)).numpy()
    save_oracle(path, OracleIndex(emb, 10, meta={"seed": 0}))
    return path


def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# ---- the misleading messages of issue 15 --------------------------------------------------

def test_classify_limit_0_is_refused_as_a_limit(capsys):
    err = _usage_error(capsys, ["classify", "some-run", "--limit", "0"])
    assert "--limit" in err and "at least 1" in err and "queries must have shape" not in err


def test_n_0_does_not_advise_more_oracles():
    index = OracleIndex(np.zeros((20, 4), np.float32), 10)
    with pytest.raises(DundiError) as exc:
        index.resolve(TwoStepRule(n=0, m=1, k=1))
    assert "at least 1" in str(exc.value) and "rebuild" not in str(exc.value)
    with pytest.raises(DundiError,
                       match=r"use n <= 2, or rebuild the index with more \(`dundi index build RUN --oracles 5`\)"):
        index.resolve(TwoStepRule(5, 1, 1))


def test_truncated_index_names_the_command_that_rebuilds_it(tmp_path):
    run = _dundi(tmp_path / "r")
    path = run / "oracle" / "v1" / "index.faiss"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DundiError, match=rf"truncated.*`dundi index build {run}`"):
        Run.load(run)
    path.unlink()
    with pytest.raises(DundiError, match=rf"index.faiss is missing; rebuild the index with `dundi index build {run}`"):
        Run.load(run)


def test_evaluate_on_a_missing_run_says_the_run_is_missing(tmp_path):
    from dundi.evaluation.config import EvalConfig
    from dundi.evaluation.evaluate import prepare

    with pytest.raises(DundiError) as exc:
        prepare(EvalConfig(run=str(tmp_path / "nope")), tmp_path / "eval")  # transfer, no --native
    assert "is not a DunDi run (no run.json)" in str(exc.value) and "--native" not in str(exc.value)


def test_classify_on_a_native_run_is_not_headed_two_step(tmp_path, capsys, data_dir):
    run = _native(tmp_path / "n")
    assert main(["classify", str(run), "--limit", "20", "--data-dir", data_dir]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "native classification (argmax of the logits)"
    assert "two-step" not in out


# ---- --version and help ----------------------------------------------------------------------

def test_version_is_the_installed_distribution(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"dundi {version('dundi')}" == f"dundi {package_version()}"


def _walk(parser: argparse.ArgumentParser, prog: str = "dundi"):
    """Every (command, parser) pair, subcommands included."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{prog} {name}")


# actions whose default needs no words: a switch is off unless given; help/version print
_NO_DEFAULT = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
               argparse._VersionAction, VersionAction, argparse._StoreConstAction, argparse._AppendConstAction,
               argparse._CountAction)


def test_every_flag_of_every_verb_has_help_with_its_default():
    missing, no_default = [], []
    commands = list(_walk(build_parser()))
    assert {"dundi train", "dundi classify", "dundi index build", "dundi evaluate", "dundi serve",
            "dundi data fetch"} <= {name for name, _ in commands}
    for name, parser in commands:
        formatter = DefaultsHelpFormatter(name)
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._SubParsersAction):
                continue
            flag = f"{name} {action.option_strings[0]}"
            if not action.help:
                missing.append(flag)
            elif not isinstance(action, _NO_DEFAULT) and not action.required:
                text = formatter._expand_help(action)
                if "default" not in text.lower():
                    no_default.append(flag)
                elif "%(default)" in formatter._get_help_string(action):
                    assert str(action.default) in text, (flag, text)
    assert not missing, f"flags without help: {missing}"
    assert not no_default, f"flags whose help does not say their default: {no_default}"


def test_help_renders_for_every_command():
    for name, parser in _walk(build_parser()):
        text = parser.format_help()
        assert text.startswith("usage: " + name), name
