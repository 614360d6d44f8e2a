"""`dundi --help` start-up time of this checkout against another commit, in one run.

Each side runs the console script's code path (``dundi.cli.main(["--help"])``) in a fresh
interpreter with its own tree first on ``sys.path``; the runs alternate so that load on the
machine falls on both alike. Prints each side's runs, medians and the ratio.

    python bench/cli_startup.py --base main --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = ("import sys\nfrom dundi.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'numpy', 'ray', 'faiss') if m in sys.modules), file=sys.stderr)\n")


def export(ref: str, into: Path) -> Path:
    """The package as committed at ``ref``, written under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "dundi"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def once(tree: Path) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, out.stderr.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="main", help="commit to compare against (default %(default)s)")
    ap.add_argument("--runs", type=int, default=5, help="runs per side (default %(default)s)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sides = {args.base: export(args.base, Path(tmp)), "this checkout": ROOT}
        for tree in sides.values():
            once(tree)  # warm the file cache: the first run of each side is not counted
        times: dict[str, list[float]] = {name: [] for name in sides}
        loaded = {}
        for _ in range(args.runs):
            for name, tree in sides.items():
                seconds, loaded[name] = once(tree)
                times[name].append(seconds)
    for name, runs in times.items():
        print(f"{name:>14}: median {statistics.median(runs):.3f} s  runs {' '.join(f'{t:.3f}' for t in runs)}  "
              f"heavy modules loaded {loaded[name]}")
    base, this = (statistics.median(times[n]) for n in sides)
    print(f"ratio this checkout / {args.base}: {this / base:.2f}")


if __name__ == "__main__":
    main()
