"""`dundi index add | remove | list`: enroll and remove classes of a run without retraining.

Each change writes a new oracle index version (dundi.run.enrollment, dundi.run.directory); a service
serving the run picks it up through its admin route (`POST /admin/classes`) or a reload.
"""

from __future__ import annotations

import argparse

from dundi.cli.args import emit, nonnegative_int, positive_int


def _images(args: argparse.Namespace):
    """The images to enroll and where they came from: files/folders/globs, or a dataset class."""
    from dundi.errors import DundiError
    from dundi.run.storage import read_meta

    if bool(args.images) == (args.label is not None):
        raise DundiError("give the class's images either as --images PATH... (PNG/JPEG files, folders, "
                         "globs) or as --label L (with --dataset and --split), not both or neither")
    if args.images:
        if args.dataset is not None or args.limit is not None or args.split != "train":
            raise DundiError("--dataset, --split and --limit choose dataset images (with --label); "
                             "they do not apply to --images")
        from dundi.run.image_files import read_images

        in_shape = read_meta(args.run)["in_shape"]
        images, files = read_images(args.images, in_shape, resize=args.resize)
        return images, None, -1, f"{len(files)} image file(s)"
    from dundi.run.enrollment import dataset_images

    images, ids, name, label = dataset_images(args.run, args.dataset, args.split, args.label,
                                              args.limit, args.data_dir)
    return images, ids, label, f"{args.dataset or 'the run dataset'} {args.split} class {args.label} ({name})"


def cmd_index_add(args: argparse.Namespace) -> None:
    from dundi.run.directory import Run
    from dundi.run.enrollment import add_class, check_class_name

    check_class_name(args.cls)
    Run.load(args.run)  # an unknown, damaged or native run is named before any image is read
    images, ids, label, source = _images(args)
    out = add_class(args.run, args.cls, images, n=args.oracles, seed=args.seed, dataset_class=label, ids=ids)
    added = out["added"]
    emit({"run": args.run, "class": args.cls, "label": out["num_classes"] - 1, "oracles": added["oracles"],
          "images": added["images"], "source": source, "version": out["version"],
          "classes": out["num_classes"]}, args.json, f"enrolled class {args.cls!r} in {args.run}")


def cmd_index_remove(args: argparse.Namespace) -> None:
    from dundi.run.enrollment import remove_class

    out = remove_class(args.run, args.cls)
    emit({"run": args.run, "class": args.cls, "version": out["version"], "classes": out["num_classes"]},
         args.json, f"removed class {args.cls!r} from {args.run}")


def cmd_index_list(args: argparse.Namespace) -> None:
    import json

    from dundi.run.enrollment import list_classes

    out = list_classes(args.run)
    if args.json:
        print(json.dumps(out))
        return
    print(f"{args.run}: {out['num_classes']} classes, index version {out['version']} "
          f"(versions {', '.join(map(str, out['versions']))})")
    width = max(len(c["name"]) for c in out["classes"])
    print(f"  {'label':>5}  {'name':<{width}}  {'oracles':>7}  dataset class")
    for c in out["classes"]:
        origin = "-" if c["dataset_class"] < 0 else str(c["dataset_class"])
        print(f"  {c['label']:>5}  {c['name']:<{width}}  {c['oracles']:>7}  {origin}")


def register(index: argparse._SubParsersAction, add_common) -> None:
    """Add `add`, `remove` and `list` to the `index` subcommand."""
    from dundi.cli import flag_values as choices

    p = index.add_parser("add", help="enroll a new class from its images (no retraining)")
    p.add_argument("run", help="DunDi run directory with an oracle index")
    p.add_argument("--class", dest="cls", required=True, metavar="NAME", help="the new class's name")
    p.add_argument("--images", nargs="+", default=None, metavar="PATH",
                   help="PNG/JPEG files, folders or glob patterns of the class (default: none; "
                        "or use --label)")
    p.add_argument("--resize", action="store_true",
                   help="scale --images of another size to the run's input size (default: refuse them)")
    p.add_argument("--dataset", default=None, choices=choices.DATASETS,
                   help="with --label: the dataset to take the class's images from (default: the run's)")
    p.add_argument("--split", default="train", choices=("train", "test"),
                   help="with --label: the split to take them from (default %(default)s)")
    p.add_argument("--label", type=nonnegative_int, default=None,
                   help="the dataset class whose images to enroll (default: none; or use --images)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="with --label: use only its first N images in the split (default: all)")
    p.add_argument("--oracles", type=positive_int, default=None,
                   help="oracles to keep, picked from the images (default: as many as the index's "
                        "fullest class; fewer images keep them all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the oracle choice (default %(default)s)")
    add_common(p)
    p.set_defaults(handler=cmd_index_add)

    p = index.add_parser("remove", help="remove a class from the index")
    p.add_argument("run", help="DunDi run directory with an oracle index")
    p.add_argument("--class", dest="cls", required=True, metavar="NAME", help="the class to remove")
    add_common(p)
    p.set_defaults(handler=cmd_index_remove)

    p = index.add_parser("list", help="the index's classes, oracle counts and version")
    p.add_argument("run", help="DunDi run directory with an oracle index")
    add_common(p)
    p.set_defaults(handler=cmd_index_list)
