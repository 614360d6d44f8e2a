"""Enrolling and removing classes of a run's oracle index, without retraining.

A DunDi model is an embedding plus a database of examples, so a new class — a person, a
product, a signer — is added by embedding a handful of its images and storing them as that
class's oracles; nothing is trained. This module is that operation on a run directory, shared
by ``dundi index add|remove|list`` and the services' ``/admin/classes`` route:

* the run is loaded (and verified) under its write lock, the index is changed in memory and
  written as the next index version (:func:`dundi.run.directory.change_oracle`), so two changes at
  once — two CLI calls, two replicas of a service — never lose one another and a process
  killed mid-write leaves the previous version live;
* up to ``n`` oracles are picked from the given images by the rule ``index build`` uses
  (:meth:`OracleIndex.select`, seeded), in the chosen order, so the first m are the coarse
  oracles just as for a built class;
* the index metadata records, per class, the dataset class it stands for (``dataset_classes``,
  -1 for classes enrolled from the user's own images), so accuracy on a dataset split counts
  enrolled dataset classes under their new labels and ignores the others.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Any

import numpy as np

from dundi.data.pixels import validate_images
from dundi.errors import DundiError
from dundi.run.directory import Run, change_oracle
from dundi.run.names import ORACLE_SEED
from dundi.run.storage import dataset_classes_of, index_version, index_versions, read_meta

MAX_NAME_CHARS = 100


def check_class_name(name: Any) -> str:
    """A class name is non-empty printable text without leading or trailing spaces: it is
    shown in every answer, tables and JSON alike."""
    if not isinstance(name, str) or not name.strip():
        raise DundiError("the class name is empty: give a name such as --class 'ada lovelace'")
    if name != name.strip() or len(name) > MAX_NAME_CHARS or \
            any(unicodedata.category(ch).startswith("C") for ch in name):
        raise DundiError(f"class name {name!r} is not accepted: use at most {MAX_NAME_CHARS} printable "
                         f"characters without leading or trailing spaces")
    return name


def index_dataset_classes(run: Run) -> list[int]:
    """Per class of the run's index: the dataset class it stands for, or -1."""
    recorded = dataset_classes_of(run.meta, run.oracle.meta)
    return list(range(run.oracle.num_classes)) if recorded is None else recorded


def _oracle_ids(run: Run) -> list[int]:
    """Sample ids of the oracles, class-major (-1: not a dataset sample)."""
    ids = run.oracle.meta.get("ids")
    total = int(sum(run.oracle.class_counts()))
    return [int(i) for i in ids] if ids is not None and len(ids) == total else [-1] * total


def _pick(count: int, n: int, seed: int) -> np.ndarray:
    """Up to n of ``count`` images, seeded: the rule `index build` applies to each class."""
    from dundi.rule.index import OracleIndex

    return OracleIndex.select(np.zeros(count, np.int64), min(n, count), seed, 1)


def add_class(run_dir: str | os.PathLike, name: str, images: Any, n: int | None = None, seed: int = ORACLE_SEED,
              dataset_class: int = -1, ids: np.ndarray | None = None) -> dict:
    """Enroll class ``name`` from ``images`` (float pixels in [0, 1] or uint8, shaped like
    the run's input): embed up to ``n`` of them (default: as many oracles as the index's
    fullest class) and write the index as a new version. ``dataset_class`` names the dataset
    class the images are (same dataset as the run), ``ids`` their sample ids. Returns the
    change as :func:`list_classes` reports the index afterwards, plus ``added``."""
    name = check_class_name(name)
    if n is not None and n < 1:
        raise DundiError(f"--oracles {n} must be at least 1")
    picked: dict[str, Any] = {}

    def change(run: Run) -> dict:
        _check_dundi(run)
        if name in run.oracle.class_names:
            raise DundiError(f"class {name!r} is already in {run_dir}: remove it first "
                             f"(`dundi index remove {run_dir} --class {name!r}`) or choose another name")
        classes = index_dataset_classes(run)
        if dataset_class >= 0 and dataset_class in classes:
            raise DundiError(f"dataset class {dataset_class} is already class "
                             f"{run.oracle.class_names[classes.index(dataset_class)]!r} of {run_dir}")
        batch = validate_images(images, tuple(run.meta["in_shape"]))
        if len(batch) == 0:
            raise DundiError(f"no images to enroll class {name!r} from: give at least one")
        limit = int(max(run.oracle.class_counts())) if n is None else n
        pick = _pick(len(batch), limit, seed)
        oracle_ids = _oracle_ids(run)
        run.oracle.add_class(name, run.embed(batch[pick]))
        new_ids = [-1] * len(pick) if ids is None else np.asarray(ids)[pick].tolist()
        run.oracle.meta.update(dataset_classes=classes + [int(dataset_class)], ids=oracle_ids + new_ids)
        picked.update(images=int(len(batch)), oracles=int(len(pick)))
        return {}

    change_oracle(run_dir, change)
    return {**list_classes(run_dir), "added": {"class": name, **picked}}


def remove_class(run_dir: str | os.PathLike, name: str, min_classes: int = 2) -> dict:
    """Remove class ``name`` (later classes move down one label) and write the index as a new
    version. ``min_classes``: refuse to leave fewer classes (a service's k)."""
    def change(run: Run) -> dict:
        _check_dundi(run)
        names = list(run.oracle.class_names)
        if name not in names:
            raise DundiError(f"{run_dir} has no class {name!r}; its classes are "
                             f"{', '.join(map(repr, names))} (`dundi index list {run_dir}`)")
        if len(names) - 1 < max(min_classes, 1):
            raise DundiError(f"removing {name!r} would leave {len(names) - 1} class(es); at least "
                             f"{max(min_classes, 1)} must remain (k of the rule answering)")
        label = names.index(name)
        classes, ids = index_dataset_classes(run), _oracle_ids(run)
        bounds = np.cumsum([0, *run.oracle.class_counts()])
        run.oracle.remove_class(name)
        del ids[bounds[label]:bounds[label + 1]]
        run.oracle.meta.update(dataset_classes=classes[:label] + classes[label + 1:], ids=ids)
        return {}

    change_oracle(run_dir, change)
    return {**list_classes(run_dir), "removed": {"class": name}}


def list_classes(run_dir: str | os.PathLike) -> dict:
    """The live index's classes (label, name, oracle count, dataset class) and versions."""
    run = Run.load(run_dir)
    _check_dundi(run)
    classes = index_dataset_classes(run)
    counts = [int(c) for c in run.oracle.class_counts()]
    meta = read_meta(run_dir)
    return {"run": str(run_dir), "version": index_version(meta), "versions": index_versions(meta),
            "num_classes": len(counts),
            "classes": [{"label": i, "name": nm, "oracles": counts[i], "dataset_class": classes[i]}
                        for i, nm in enumerate(run.oracle.class_names)]}


def dataset_images(run_dir: str | os.PathLike, dataset: str | None, split: str, label: int,
                   limit: int | None, data_dir: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray, str, int]:
    """The first ``limit`` images of dataset class ``label`` in ``split`` (split order), their
    ids, the class's dataset name, and the label to record (-1 for another dataset)."""
    from dundi.data import DATASETS, load_split

    meta = read_meta(run_dir)
    dataset = dataset or meta["dataset"]
    if dataset not in DATASETS:
        raise DundiError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    spec = DATASETS[dataset]
    if not 0 <= label < spec.num_classes:
        raise DundiError(f"--label {label} is not a class of {dataset}: use 0..{spec.num_classes - 1}")
    images, labels, ids = load_split(dataset, split, data_dir)
    rows = np.flatnonzero(labels == label)[:limit]
    if len(rows) == 0:
        raise DundiError(f"{dataset} {split} has no images of class {label}")
    same = dataset == meta["dataset"]
    return images[rows], ids[rows], spec.class_names[label], label if same else -1


def _check_dundi(run: Run) -> None:
    if run.oracle is None:
        raise DundiError(f"{run.path} is a native run: classes are enrolled in a DunDi run's "
                         f"oracle index (`dundi train`, then `dundi index build`)")
