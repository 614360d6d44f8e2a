"""`dundi data fetch | info`, the handler half (the flags: dundi.cli.pipeline_cmds): the
dataset cache only, so listing datasets never loads torch."""

from __future__ import annotations

import argparse

from dundi.cli.args import emit
from dundi.data import cache_info, fetch


def cmd_data_fetch(args: argparse.Namespace) -> None:
    path = fetch(args.dataset, data_dir=args.data_dir, source_dir=args.source_dir)
    info = next((i for i in cache_info(args.data_dir) if i.get("dataset") == args.dataset), {})
    emit({"dataset": args.dataset, "path": str(path), **info}, args.json, f"cached {args.dataset}")


def cmd_data_info(args: argparse.Namespace) -> None:
    rows = cache_info(args.data_dir)
    if args.json:
        emit({"datasets": rows}, True)
        return
    if not rows:
        print("no dataset cached yet: run `dundi data fetch mnist-10k`")
    for row in rows:
        emit(row, False, row.get("dataset"))
