"""Enrolling held-out classes without retraining, against a model trained on every class.

For each pair (a run trained on 8 of a dataset's 10 classes, its twin trained on all 10 with
the same settings), the 2 held-out classes are enrolled into a copy of the 8-class run from
the first N images of each in the train split (``dundi index add RUN --class NAME --label L
--limit N``), for every N in --sizes, and each model is scored on the whole test split: old
classes (the 8 it was trained on), new classes (the 2 enrolled) and all. Both sides are
computed in this one run and printed side by side as a Markdown table (and JSON with --json).

    python bench/enrollment.py --runs /work/main/runs/enroll --out runs/enrollment
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from dundi.artifacts import Run
from dundi.data import load_split
from dundi.enrollment import add_class, dataset_images
from dundi.pipeline import run_rows

PAIRS = (  # name, 8-class run, 10-class twin (relative to --runs unless absolute)
    ("mnist-10k DunDi_R", "mnist-R8", "mnist-R10"),
    ("Fashion-MNIST DunDi_R", "fashion-R8", "fashion-R10"),
    ("mnist-10k DunDi-AT", "mnist-AT8", "/work/main/runs/at/AT5"),
)


def enrolled_copy(src: Path, dst: Path, size: int, data_dir: str | None) -> Path:
    """``src`` with its held-out classes enrolled from their first ``size`` train images."""
    if (dst / "run.json").exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".checkpoint", "*.log"))
    meta = json.loads((src / "run.json").read_text())
    for label in meta["config"]["holdout_classes"]:
        images, ids, name, dataset_class = dataset_images(tmp, None, "train", label, size, data_dir)
        add_class(tmp, name, images, dataset_class=dataset_class, ids=ids)
    tmp.rename(dst)
    return dst


def scores(run_dir: Path, held_out: list[int], data_dir: str | None) -> dict:
    """Test-split accuracy of a run on its old classes, the held-out ones and all it answers."""
    run = Run.load(run_dir)
    images, labels, ids = load_split(run.meta["dataset"], "test", data_dir)
    x, y, kept_ids = run_rows(run.meta, images, labels, ids)
    dataset_label = labels[np.searchsorted(ids, kept_ids)] if np.all(np.diff(ids) > 0) else \
        np.array([labels[np.flatnonzero(ids == i)[0]] for i in kept_ids])
    t0 = time.time()
    answers = run.classify(x).labels
    correct = answers == y
    new = np.isin(dataset_label, held_out)
    return {"old": float(correct[~new].mean()), "new": float(correct[new].mean()) if new.any() else None,
            "all": float(correct.mean()), "count_old": int((~new).sum()), "count_new": int(new.sum()),
            "classes": run.oracle.num_classes, "seconds": round(time.time() - t0, 2)}


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="/work/main/runs/enroll", help="folder holding the runs of PAIRS")
    ap.add_argument("--out", default="runs/enrollment", help="where the enrolled copies are written")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 20], help="images per enrolled class")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, eight, ten in PAIRS:
        src, twin = Path(args.runs) / eight, Path(args.runs) / ten
        if not (src / "run.json").exists() or not (twin / "run.json").exists():
            print(f"skipped {name}: {src} or {twin} is missing")
            continue
        held_out = json.loads((src / "run.json").read_text())["config"]["holdout_classes"]
        rows.append({"pair": name, "model": "8 classes, before enrollment", "images": None,
                     **scores(src, held_out, args.data_dir)})
        for size in args.sizes:
            run = enrolled_copy(src, out / f"{eight}-enrolled-{size}", size, args.data_dir)
            rows.append({"pair": name, "model": "8 classes + 2 enrolled", "images": size, "run": str(run),
                         **scores(run, held_out, args.data_dir)})
        rows.append({"pair": name, "model": "trained on all 10", "images": None,
                     **scores(twin, held_out, args.data_dir)})
    print("| data, method | model | images per new class | old classes | new classes | all |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['model']} | {r['images'] or '—'} | {pct(r['old'])} | {pct(r['new'])} | {pct(r['all'])} |")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
