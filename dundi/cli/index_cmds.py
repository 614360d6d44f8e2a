"""`dundi index add | remove | list`, the parser half: enroll and remove classes of a run
without retraining (the handlers: dundi.cli.index_handlers). Imports no torch.

Each change writes a new oracle index version (dundi.run.enrollment, dundi.run.storage); a
service serving the run picks it up through its admin route (`POST /admin/classes`) or a reload.
"""

from __future__ import annotations

import argparse

from dundi.cli.args import handler, nonnegative_int, positive_int
from dundi.data.specs import DATASETS, SPLITS
from dundi.run.names import ORACLE_SEED

HANDLERS = "dundi.cli.index_handlers"


def register(index: argparse._SubParsersAction, add_common) -> None:
    """Add `add`, `remove` and `list` to the `index` subcommand."""
    p = index.add_parser("add", help="enroll a new class from its images (no retraining)")
    p.add_argument("run", help="DunDi run directory with an oracle index")
    p.add_argument("--class", dest="cls", required=True, metavar="NAME", help="the new class's name")
    p.add_argument("--images", nargs="+", default=None, metavar="PATH",
                   help="PNG/JPEG files, folders or glob patterns of the class (default: none; "
                        "or use --label)")
    p.add_argument("--resize", action="store_true",
                   help="scale --images of another size to the run's input size (default: refuse them)")
    p.add_argument("--dataset", default=None, choices=tuple(DATASETS),
                   help="with --label: the dataset to take the class's images from (default: the run's)")
    p.add_argument("--split", default="train", choices=SPLITS,
                   help="with --label: the split to take them from (default %(default)s)")
    p.add_argument("--label", type=nonnegative_int, default=None,
                   help="the dataset class whose images to enroll (default: none; or use --images)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="with --label: use only its first N images in the split (default: all)")
    p.add_argument("--oracles", type=positive_int, default=None,
                   help="oracles to keep, picked from the images (default: as many as the index's "
                        "fullest class; fewer images keep them all)")
    p.add_argument("--seed", type=int, default=ORACLE_SEED, help="seed of the oracle choice (default %(default)s)")
    add_common(p)
    p.set_defaults(handler=handler(HANDLERS, "cmd_index_add"))

    p = index.add_parser("remove", help="remove a class from the index")
    p.add_argument("run", help="DunDi run directory with an oracle index")
    p.add_argument("--class", dest="cls", required=True, metavar="NAME", help="the class to remove")
    add_common(p)
    p.set_defaults(handler=handler(HANDLERS, "cmd_index_remove"))

    p = index.add_parser("list", help="the index's classes, oracle counts and version")
    p.add_argument("run", help="DunDi run directory with an oracle index")
    add_common(p)
    p.set_defaults(handler=handler(HANDLERS, "cmd_index_list"))
