"""The house's import direction (docs/ARCHITECTURE.md): the Ray-free core never imports ray, the
Ray edge (dundi.distributed) or the CLI; the edge never imports the CLI; inside the core each
room imports only rooms before it; no modules import each other round a loop. Checked by
reading every import statement (function-level and relative ones included), and by importing
every core module in a fresh interpreter."""

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


# The rooms in dependency order: a module may import its own room and rooms before it.
ROOMS = ["dundi.errors", "dundi.files", "dundi.progress", "dundi.data", "dundi.rule", "dundi.nets",
         "dundi.attacks", "dundi.training", "dundi.robustness", "dundi.run", "dundi.evaluation",
         "dundi.serving", "dundi.distributed", "dundi.cli", "dundi.__main__"]


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved; ``from pkg import name`` counts as
    ``pkg.name`` where that is a module (a submodule, not the package's __init__)."""
    modules = all_modules()
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                names.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return names


def room_of(name: str) -> int | None:
    matches = [i for i, room in enumerate(ROOMS) if name == room or name.startswith(room + ".")]
    return matches[0] if matches else None


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


def test_the_rooms_cover_the_package_and_relative_imports_are_read():
    assert all(room_of(m) is not None for m in all_modules() if m != "dundi"), \
        [m for m in all_modules() if m != "dundi" and room_of(m) is None]
    assert "dundi.attacks.apgd" in imports_of(PACKAGE / "attacks" / "__init__.py")  # `from .apgd import`


def test_each_room_imports_only_rooms_before_it():
    wrong = {}
    for name, path in all_modules().items():
        own = room_of(name)
        later = sorted(m for m in imports_of(path) if m.startswith("dundi.")
                       and (room_of(m) or 0) > (own if own is not None else len(ROOMS)))
        if later:
            wrong[name] = later
    assert not wrong, f"imports of rooms later in the order (docs/ARCHITECTURE.md): {wrong}"


def test_no_modules_import_each_other_round_a_loop():
    modules = all_modules()
    graph = {m: {i for i in imports_of(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    loops = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for nxt in sorted(graph[m]):
            if state.get(nxt) == 1:
                loops.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not loops, f"import loops: {loops[:3]}"
