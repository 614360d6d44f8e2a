"""The house's import direction (docs/ARCHITECTURE.md): the Ray-free core never imports ray, the
Ray edge (dundi.distributed) or the CLI; the edge never imports the CLI. Checked twice: by
reading every import statement (function-level ones included), and by importing every core
module in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import dundi

PACKAGE = Path(dundi.__file__).parent
EDGE, CLI = "dundi.distributed", "dundi.cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def core_modules() -> list[str]:
    return [m for m in all_modules() if not m.startswith((EDGE, CLI)) and m != "dundi.__main__"]


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def reaches(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if n == prefixes or any(n == p or n.startswith(p + ".") for p in prefixes))


def test_the_core_is_all_the_modules_outside_the_edge_and_the_cli():
    core = core_modules()
    for expected in ("dundi.rule.index", "dundi.training.passes", "dundi.training.loop", "dundi.rule.params", "dundi.serving.app",
                     "dundi.attacks.apgd", "dundi.data.cache", "dundi.robustness.certificate"):
        assert expected in core
    assert len(core) >= 50, core


def test_no_import_statement_runs_back_up_the_house():
    wrong = {}
    for name, path in all_modules().items():
        if name.startswith(CLI) or name == "dundi.__main__":
            continue
        banned = ("ray", EDGE, CLI) if not name.startswith(EDGE) else (CLI,)
        found = reaches(imports_of(path), banned)
        if found:
            wrong[name] = found
    assert not wrong, f"imports running back up the house: {wrong}"


def test_every_core_module_imports_without_ray():
    mods = core_modules()
    code = (
        "import importlib, sys\n"
        f"mods = {mods!r}\n"
        "for m in mods: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'ray' or m.startswith(('dundi.distributed', 'dundi.cli')))\n"
        "assert not bad, bad[:5]\n"
        "print(len(mods))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == len(mods)
