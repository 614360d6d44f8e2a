"""The Ray-free core never imports ray (docs/ARCHITECTURE.md)."""

import subprocess
import sys

CORE = ["dundi", "dundi.models", "dundi.loss", "dundi.tuples", "dundi.oracle", "dundi.classify",
        "dundi.train", "dundi.artifacts", "dundi.inference", "dundi.pipeline", "dundi.demo",
        "dundi.data", "dundi.attacks", "dundi.evaluate", "dundi.results", "dundi.report",
        "dundi.threats", "dundi.serving"]


def test_core_modules_do_not_import_ray():
    code = (
        "import importlib, importlib.util, sys\n"
        f"mods = {CORE!r}\n"
        "present = [m for m in mods if importlib.util.find_spec(m) is not None]\n"
        "for m in present: importlib.import_module(m)\n"
        "print(len(present))\n"
        "assert 'ray' not in sys.modules, [m for m in sys.modules if m.startswith('ray')][:5]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 10  # the core modules really were imported
