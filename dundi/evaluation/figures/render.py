"""`python -m dundi.evaluation.figures`: rewrite every marked block from its raw files, or with
--check write nothing and exit 1 naming each stale block (2: a raw file is missing or a block
is unknown, in one line)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dundi.errors import DundiError
from dundi.evaluation.figures.markers import pages, render_text, stale_blocks
from dundi.files import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dundi.evaluation.figures",
                                     description="Render the published tables from committed raw files.")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = stale_blocks(args.root)
            for line in stale:
                print(f"stale: {line}")
            return 1 if stale else 0
        for page in pages(args.root):
            text = page.read_text()
            rendered = render_text(text, args.root)
            if rendered != text:
                atomic_write_text(page, rendered)
                print(f"rendered {page.relative_to(args.root)}")
    except DundiError as err:
        print(f"dundi: {err}", file=sys.stderr)
        return 2
    return 0
