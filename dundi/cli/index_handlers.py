"""`dundi index add | remove | list`, the handler half (the flags: dundi.cli.index_cmds)."""

from __future__ import annotations

import argparse
import json

from dundi.cli.args import emit
from dundi.errors import DundiError
from dundi.run.directory import Run
from dundi.run.enrollment import add_class, check_class_name, dataset_images, list_classes, remove_class
from dundi.run.image_files import read_images
from dundi.run.storage import read_meta


def _images(args: argparse.Namespace):
    """The images to enroll and where they came from: files/folders/globs, or a dataset class."""
    if bool(args.images) == (args.label is not None):
        raise DundiError("give the class's images either as --images PATH... (PNG/JPEG files, folders, "
                         "globs) or as --label L (with --dataset and --split), not both or neither")
    if args.images:
        if args.dataset is not None or args.limit is not None or args.split != "train":
            raise DundiError("--dataset, --split and --limit choose dataset images (with --label); "
                             "they do not apply to --images")
        in_shape = read_meta(args.run)["in_shape"]
        images, files = read_images(args.images, in_shape, resize=args.resize)
        return images, None, -1, f"{len(files)} image file(s)"

    images, ids, name, label = dataset_images(args.run, args.dataset, args.split, args.label,
                                              args.limit, args.data_dir)
    return images, ids, label, f"{args.dataset or 'the run dataset'} {args.split} class {args.label} ({name})"


def cmd_index_add(args: argparse.Namespace) -> None:
    check_class_name(args.cls)
    Run.load(args.run)  # an unknown, damaged or native run is named before any image is read
    images, ids, label, source = _images(args)
    out = add_class(args.run, args.cls, images, n=args.oracles, seed=args.seed, dataset_class=label, ids=ids)
    added = out["added"]
    emit({"run": args.run, "class": args.cls, "label": out["num_classes"] - 1, "oracles": added["oracles"],
          "images": added["images"], "source": source, "version": out["version"],
          "classes": out["num_classes"]}, args.json, f"enrolled class {args.cls!r} in {args.run}")


def cmd_index_remove(args: argparse.Namespace) -> None:
    out = remove_class(args.run, args.cls)
    emit({"run": args.run, "class": args.cls, "version": out["version"], "classes": out["num_classes"]},
         args.json, f"removed class {args.cls!r} from {args.run}")


def cmd_index_list(args: argparse.Namespace) -> None:
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
