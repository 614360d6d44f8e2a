"""Enrolling held-out classes without retraining, against a model trained on every class.

For each pair (a run trained on 8 of a dataset's 10 classes, its twin trained on all 10 with
the same settings), the 2 held-out classes are enrolled into a copy of the 8-class run from
the first N images of each in the train split (``dundi index add RUN --class NAME --label L
--limit N``), for every N in --sizes, and each model is scored on the whole test split: old
classes (the 8 it was trained on), new classes (the 2 enrolled) and all. Both sides are
computed in this one run and printed side by side as a Markdown table (and JSON with --json).

With --certified, every certified DunDi model is certified on the whole test split at L∞ eps
0.1, 0.2 and 0.3 (dundi.robustness.certificate, the deployed n, m, k), split into old and new classes.

With --robust, every DunDi-AT model of the table is also attacked on the whole test split by
`dundi evaluate --threat adaptive --attacks pgd --eps 0.3` (white-box on the two-step rule as
deployed, resumable), and clean and robust accuracy are split into old and new classes.

    python bench/enrollment.py --runs runs/enroll --at10 runs/at/AT5 --out runs/enrollment --robust
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dundi.data import load_split
from dundi.run.directory import Run
from dundi.run.enrollment import add_class, dataset_images
from dundi.run.pipeline import run_rows

PAIRS = (  # name, 8-class run, 10-class twin (in --runs; "at10"/"cert10": the flag's run)
    ("mnist-10k DunDi_R", "mnist-R8", "mnist-R10"),
    ("Fashion-MNIST DunDi_R", "fashion-R8", "fashion-R10"),
    ("mnist-10k DunDi-AT", "mnist-AT8", "at10"),
    ("mnist-10k certified DunDi", "mnist-C8", "cert10"),
)
CERT_EPS = (0.1, 0.2, 0.3)


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


def dataset_labels(labels: np.ndarray, ids: np.ndarray, kept_ids: np.ndarray) -> np.ndarray:
    """The dataset labels of the rows a run kept (by sample id)."""
    if np.all(np.diff(ids) > 0):
        return labels[np.searchsorted(ids, kept_ids)]
    return np.array([labels[np.flatnonzero(ids == i)[0]] for i in kept_ids])


def scores(run_dir: Path, held_out: list[int], data_dir: str | None) -> dict:
    """Test-split accuracy of a run on its old classes, the held-out ones and all it answers."""
    run = Run.load(run_dir)
    images, labels, ids = load_split(run.meta["dataset"], "test", data_dir)
    x, y, kept_ids = run_rows(run.meta, images, labels, ids)
    dataset_label = dataset_labels(labels, ids, kept_ids)
    t0 = time.time()
    answers = run.classify(x).labels
    correct = answers == y
    new = np.isin(dataset_label, held_out)
    spread = oracle_spread(run)
    new_labels = run_label_of(run, held_out)  # share of each old class answered as a new one
    return {"spread_old": float(np.mean([spread[c] for c in range(run.oracle.num_classes)
                                         if c not in new_labels])),
            "spread_new": float(np.mean([spread[c] for c in new_labels])) if new_labels else None,
            "to_new": {run.class_names[c]: float(np.isin(answers[y == c], new_labels).mean())
                       for c in range(run.oracle.num_classes) if c not in new_labels and (y == c).any()},
            "old": float(correct[~new].mean()), "new": float(correct[new].mean()) if new.any() else None,
            "all": float(correct.mean()), "count_old": int((~new).sum()), "count_new": int(new.sum()),
            "classes": run.oracle.num_classes, "seconds": round(time.time() - t0, 2)}


ATTACK = ["--threat", "adaptive", "--attacks", "pgd", "--eps", "0.3"]


def robust(run_dir: Path, out: Path, new_labels: list[int], data_dir: str | None) -> dict:
    """Clean and adaptive-PGD robust accuracy (eps 0.3) on old and new classes: the rows of
    `dundi evaluate` (run here, or resumed), split by the run's own labels."""
    import pyarrow.parquet as pq

    cmd = [sys.executable, "-m", "dundi", "evaluate", str(run_dir), *ATTACK, "--workers", "0",
           "--no-progress", "--out", str(out), *(["--data-dir", data_dir] if data_dir else [])]
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    rows = pq.read_table(out / "shards", columns=["label", "dundi_clean", "dundi_adv"]).to_pydict()
    label, clean, adv = (np.asarray(rows[k]) for k in ("label", "dundi_clean", "dundi_adv"))
    new = np.isin(label, new_labels)
    part = {}
    for group, mask in (("old", ~new), ("new", new)):
        part[f"clean_{group}"] = float((clean == label)[mask].mean()) if mask.any() else None
        part[f"robust_{group}"] = float((adv == label)[mask].mean()) if mask.any() else None
    return {**part, "attacked": int(len(label)), "eval": str(out)}


def oracle_spread(run: Run) -> list[float]:
    """Per class: the mean distance between two of its oracles (how diffuse it is)."""
    out = []
    for c in range(run.oracle.num_classes):
        o = run.oracle.class_oracles(c).astype(np.float64)
        d = np.sqrt(((o[:, None] - o[None]) ** 2).sum(-1))
        out.append(float(d.sum() / max(1, len(o) * (len(o) - 1))))
    return out


def run_label_of(run: Run, dataset_classes: list[int]) -> list[int]:
    """The run's labels of these dataset classes (those it holds)."""
    from dundi.run.storage import dataset_classes_of

    held = dataset_classes_of(run.meta, run.oracle.meta) or list(range(run.oracle.num_classes))
    return [held.index(c) for c in dataset_classes if c in held]


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def certified(run_dir: Path, held_out: list[int], data_dir: str | None) -> dict:
    """Certified accuracy (the deployed rule's answer provably unchanged in the L∞ ball) on old
    and new classes at CERT_EPS; None where a class holds fewer than n oracles (refused)."""
    from dundi.errors import DundiError

    run = Run.load(run_dir)
    images, labels, ids = load_split(run.meta["dataset"], "test", data_dir)
    x, y, kept_ids = run_rows(run.meta, images, labels, ids)
    new = np.isin(dataset_labels(labels, ids, kept_ids), held_out)
    try:
        cert = run.certifier().batched(x, y, eps=list(CERT_EPS))["certified"]
    except DundiError as exc:
        return {"refused": str(exc)}
    return {f"{group}@{e}": float(cert[mask, i].mean()) if mask.any() else None
            for i, e in enumerate(CERT_EPS) for group, mask in (("old", ~new), ("new", new))}


def certified_table(rows: list[dict], data_dir: str | None) -> None:
    """Certify every model of the certified pair, old vs new classes."""
    print("\n| model | images per new class | " + " | ".join(f"certified old / new @ {e}" for e in CERT_EPS) + " |")
    print("|---|---|" + "---|" * len(CERT_EPS))
    for r in rows:
        if "certified" not in r["pair"]:
            continue
        r["certificates"] = c = certified(Path(r.get("run") or r["src"]), r["held_out"], data_dir)
        cells = (["refused: a class holds fewer than n oracles"] if "refused" in c else
                 [f"{pct(c[f'old@{e}'])} / {pct(c[f'new@{e}'])}" for e in CERT_EPS])
        print(f"| {r['model']} | {r['images'] or '—'} | " + " | ".join(cells) + " |")


def robust_table(rows: list[dict], out: Path, data_dir: str | None) -> None:
    """Attack every DunDi-AT model of ``rows`` and print clean/robust accuracy, old vs new."""
    print("\n| model | images per new class | clean old | clean new | robust old | robust new | attacked |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "DunDi-AT" not in r["pair"]:
            continue
        run = Path(r.get("run") or "")
        if r["model"].startswith("8 classes,"):
            run, new_labels = Path(r["src"]), []
        elif r["model"].startswith("trained"):
            run, new_labels = Path(r["src"]), r["held_out"]
        else:  # enrolled after the classes it was trained on
            trained = json.loads((run / "run.json").read_text())["num_classes"]
            new_labels = list(range(trained, r["classes"]))
        r.update(robust(run, out / f"eval-{run.name}", new_labels, data_dir))
        print(f"| {r['model']} | {r['images'] or '—'} | {pct(r['clean_old'])} | {pct(r['clean_new'])} | "
              f"{pct(r['robust_old'])} | {pct(r['robust_new'])} | {r['attacked']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/enroll", help="folder holding the runs of PAIRS")
    ap.add_argument("--at10", default="runs/at/AT5", help="the DunDi-AT run trained on all 10 classes")
    ap.add_argument("--cert10", default="runs/results/cert/mnist-C",
                    help="the certified DunDi run trained on all 10 classes")
    ap.add_argument("--out", default="runs/enrollment", help="where the enrolled copies are written")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 20], help="images per enrolled class")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--robust", action="store_true", help="also attack the DunDi-AT models (adaptive PGD)")
    ap.add_argument("--certified", action="store_true", help="also certify the certified DunDi models")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, eight, ten in PAIRS:
        src, twin = Path(args.runs) / eight, Path(getattr(args, ten)) if ten in ("at10", "cert10") else Path(args.runs) / ten
        if not (src / "run.json").exists() or not (twin / "run.json").exists():
            print(f"skipped {name}: {src} or {twin} is missing")
            continue
        held_out = json.loads((src / "run.json").read_text())["config"]["holdout_classes"]
        rows.append({"pair": name, "model": "8 classes, before enrollment", "images": None, "src": str(src),
                     "held_out": held_out, **scores(src, held_out, args.data_dir)})
        for size in args.sizes:
            run = enrolled_copy(src, out / f"{eight}-enrolled-{size}", size, args.data_dir)
            rows.append({"pair": name, "model": "8 classes + 2 enrolled", "images": size, "run": str(run),
                         "held_out": held_out, **scores(run, held_out, args.data_dir)})
        rows.append({"pair": name, "model": "trained on all 10", "images": None, "src": str(twin),
                     "held_out": held_out, **scores(twin, held_out, args.data_dir)})
    print("| data, method | model | images per new class | old classes | new classes | all |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['model']} | {r['images'] or '—'} | {pct(r['old'])} | {pct(r['new'])} | {pct(r['all'])} |")
    if args.robust:
        robust_table(rows, out, args.data_dir)
    if args.certified:
        certified_table(rows, args.data_dir)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
