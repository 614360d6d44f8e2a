"""What every command module shares: flag types that name what they accept, the two-step
rule's flags, the handler reference the parsers set, and the one way figures are printed.
Kept apart from the parser (main.py) so command modules import it and the parser imports
them: imports run one way. Imports no torch (docs/ARCHITECTURE.md, "The command line").
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from typing import Any, Callable

from dundi.rule import params as rule


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



def _type(convert: Callable[[str], Any], check: Callable[[Any], bool], wanted: str
          ) -> Callable[[str], Any]:
    """An argparse type: convert, then check, else one message naming what is accepted."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {wanted}")
        return value

    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


positive_int = _type(int, lambda v: v >= 1, "an integer of at least 1")
nonnegative_int = _type(int, lambda v: v >= 0, "an integer of at least 0")
positive_float = _type(float, lambda v: math.isfinite(v) and v > 0, "a number above 0")
nonnegative_float = _type(float, lambda v: math.isfinite(v) and v >= 0, "a number of at least 0")
unit_float = _type(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
fraction = _type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
open_fraction = _type(float, lambda v: 0 < v < 1, "a number in (0, 1)")
port_number = _type(int, lambda v: 1 <= v <= 65535, "a TCP port in 1-65535")


def handler(module: str, name: str) -> Callable[[argparse.Namespace], int | None]:
    """The command's handler ``module.name``, imported only when the command runs: handler
    modules import torch and the core at their top, the parsers that name them must not."""

    def run(args: argparse.Namespace) -> int | None:
        return getattr(importlib.import_module(module), name)(args)

    run.__name__, run.__qualname__ = name, f"{module}.{name}"
    return run


def add_two_step_args(p: Any) -> None:
    """--n, --m, --k of the two-step rule, with the defaults of :mod:`dundi.rule.params` (one
    home): every command that applies the rule reads them the same way (:func:`rule_from_args`)."""
    p.add_argument("--n", type=positive_int, default=None,
                   help="fine-step oracles per class (default: all in the index)")
    p.add_argument("--m", type=positive_int, default=None,
                   help=f"coarse-step oracles per class (default: min({rule.COARSE_ORACLES}, n))")
    p.add_argument("--k", type=positive_int, default=rule.KEPT_CLASSES,
                   help="classes kept by the coarse step (default %(default)s)")


def served_model_from_args(run: str, args: argparse.Namespace, loaded=None):
    """The run as `dundi serve` serves it under the flags' rule, with the abstain rule the flags
    ask for (a line on stderr says which); ``loaded``: the run already loaded, not read again."""
    import sys

    from dundi.serving.served import served_model

    config, model, how = served_model(run, rule_from_args(args), args.abstain_threshold, args.false_abstain,
                                      getattr(args, "data_dir", None), args.calibration_limit, loaded,
                                      getattr(args, "certify_eps", None), getattr(args, "certificates", True))
    print(f"dundi: {how}", file=sys.stderr)
    return config, model


def rule_from_args(args: argparse.Namespace):
    """The :class:`dundi.rule.params.TwoStepRule` of --n/--m/--k (refused in one line if m > n)."""
    from dundi.rule.params import TwoStepRule

    return TwoStepRule(args.n, args.m, args.k)
