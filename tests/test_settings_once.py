"""One home per setting: the two-step rule's n, m and k defaults are declared in dundi/rule/params.py
and nowhere else. This reads every module's syntax tree and fails on a literal written as a
default of n, m, k or the oracle count anywhere in the package: a function parameter, a
dataclass or pydantic field, an argparse flag, ``min(3, n)`` or ``.get("oracles", 20)``."""

import ast
from pathlib import Path

import dundi
from dundi.rule import params as rule

PACKAGE = Path(dundi.__file__).parent
NAMES = {"n", "m", "k", "oracles"}
FLAGS = {"--n", "--m", "--k", "--oracles"}


def _literal_int(node: ast.AST | None) -> bool:
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Field" and node.args:
        node = node.args[0]  # pydantic Field(default, ...)
    return isinstance(node, ast.Constant) and type(node.value) is int


def _param_defaults(fn: ast.FunctionDef | ast.AsyncFunctionDef):
    args = fn.args
    positional = args.posonlyargs + args.args
    yield from zip(positional[len(positional) - len(args.defaults):], args.defaults)
    yield from ((a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None)


def _call_hits(node: ast.Call) -> bool:
    func = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
    if func == "add_argument" and node.args and getattr(node.args[0], "value", None) in FLAGS:
        return any(kw.arg == "default" and _literal_int(kw.value) for kw in node.keywords)
    if func == "min" and any(isinstance(a, ast.Name) and a.id == "n" for a in node.args):
        return any(_literal_int(a) for a in node.args)
    if func == "get" and len(node.args) == 2 and getattr(node.args[0], "value", None) in NAMES:
        return _literal_int(node.args[1])
    return False


def literal_defaults(tree: ast.AST) -> list[int]:
    """Line numbers where a literal default of n, m, k or the oracle count is written."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = {a.arg for a in node.args.args + node.args.kwonlyargs}
            names = NAMES if params & {"m", "k"} else NAMES - {"n"}  # a lone `n` is any count
            lines += [d.lineno for a, d in _param_defaults(node) if a.arg in names and _literal_int(d)]
        elif isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) in NAMES:
            lines += [node.lineno] if _literal_int(node.value) else []
        elif isinstance(node, ast.Call) and _call_hits(node):
            lines.append(node.lineno)
    return lines


def test_the_checker_finds_each_kind_of_literal_default():
    src = ("def f(x, m=3, *, k: int = 5): pass\n"
           "class C:\n    n: int = 20\n    m: int = Field(3, description='')\n"
           "p.add_argument('--oracles', default=20)\n"
           "m = min(3, n)\nd.get('oracles', 20)\n"
           "def ok(x, m=COARSE, k=None): return min(len(x), n)\n"
           "def update(self, n=1): pass\n")
    assert literal_defaults(ast.parse(src)) == [1, 1, 3, 4, 5, 6, 7]


def test_no_module_writes_a_two_step_default_of_its_own():
    found = {str(p.relative_to(PACKAGE.parent)): lines for p in sorted(PACKAGE.rglob("*.py"))
             if p.relative_to(PACKAGE) != Path("rule/params.py") and (lines := literal_defaults(ast.parse(p.read_text())))}
    assert not found, f"write these defaults as dundi.rule.params names: {found}"


def test_the_rule_module_holds_the_paper_s_settings():
    assert (rule.ORACLES_PER_CLASS, rule.COARSE_ORACLES, rule.KEPT_CLASSES) == (20, 3, 5)
    assert rule.coarse_default(1) == 1 and rule.coarse_default(20) == 3
    import numpy as np

    from dundi.rule.index import OracleIndex

    index = OracleIndex(np.zeros((60, 2), np.float32), 6)
    assert index.resolve(rule.TwoStepRule()).request == rule.TwoStepRule(10, 3, 5)
    assert index.resolve().distance.name == rule.DEFAULT_METRIC


def _serve_parser():
    import argparse

    from dundi.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_serve_flags_take_their_defaults_from_the_declarations():
    """`dundi serve`'s flags and the Serve app's arguments are the serving declarations'
    (DeploymentSettings, ServeSettings, ModelConfig, dundi.rule.params): change one, all follow."""
    from dundi.serving.settings import DeploymentSettings, ServeSettings

    d = vars(_serve_parser().parse_args(["RUN"]))
    deploy, limits = DeploymentSettings(), ServeSettings()
    assert (d["replicas"], d["target_ongoing"], d["batch_size"], d["replica_cpus"], d["torch_threads"]) == (
        deploy.replicas, deploy.target_ongoing_requests, deploy.max_batch_size, deploy.replica_cpus,
        deploy.torch_threads)
    assert d["batch_wait_ms"] / 1000 == deploy.batch_wait_timeout_s
    assert (d["model_name"], d["max_batch"], d["max_body_bytes"], d["timeout"]) == (
        limits.model_name, limits.max_batch, limits.max_body_bytes, limits.request_timeout_s)
    assert (d["n"], d["m"], d["k"]) == (None, None, rule.KEPT_CLASSES)  # m None: min(3, n), as everywhere


def test_serve_app_args_are_composed_of_the_declarations():
    import dataclasses

    from dundi.distributed.serve_app import SETTINGS_RENAMED, ServeAppArgs
    from dundi.serving.model import ModelConfig
    from dundi.serving.settings import DeploymentSettings, ServeSettings

    declared = {SETTINGS_RENAMED.get(f.name, f.name): f.default for c in (ModelConfig, ServeSettings, DeploymentSettings)
                for f in dataclasses.fields(c)}
    fields = ServeAppArgs.model_fields
    assert set(fields) == set(declared)
    assert all(fields[k].default == v for k, v in declared.items() if v is not dataclasses.MISSING)
    args = ServeAppArgs(run="r", k=7, max_request_batch=9, replicas=2)
    assert (args.model_config_dict()["k"], args.settings().max_batch, args.deployment().replicas) == (7, 9, 2)


def metric_defaults(tree: ast.AST) -> list[int]:
    """Line numbers where a distance's name is written as a default: a parameter's, a
    declared field's, a ``.get`` fallback's or a flag's."""
    named = lambda node: isinstance(node, ast.Constant) and node.value in rule.METRICS  # noqa: E731
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines += [d.lineno for _, d in _param_defaults(node) if named(d)]
        elif isinstance(node, ast.AnnAssign) and node.value is not None and named(node.value):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call):
            func = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if func == "get" and len(node.args) == 2 and named(node.args[1]):
                lines.append(node.lineno)
            elif any(kw.arg == "default" and named(kw.value) for kw in node.keywords):
                lines.append(node.lineno)
    return lines


def test_the_metric_s_default_has_one_home():
    """The default distance is dundi.rule.params.DEFAULT_METRIC; nothing else writes it."""
    src = ("def f(x, metric='euclidean'): pass\nclass C:\n    metric: str = 'euclidean'\n"
           "m.get('metric', 'sqeuclidean')\np.add_argument('--metric', default='euclidean')\n"
           "def ok(metric=DEFAULT_METRIC): return metric == 'sqeuclidean'\n")
    assert metric_defaults(ast.parse(src)) == [1, 3, 4, 5]
    found = {str(p.relative_to(PACKAGE.parent)): lines for p in sorted(PACKAGE.rglob("*.py"))
             if (lines := metric_defaults(ast.parse(p.read_text())))}
    assert not found, f"write the metric's default as dundi.rule.params.DEFAULT_METRIC: {found}"
