"""Certified DunDi (docs/results/certified/README.md): certified accuracy against eps, three
training seeds, and proof beside attack on the same images."""

from __future__ import annotations

from pathlib import Path

from dundi.errors import DundiError
from dundi.evaluation.figures.raw import evaluation_of, mean_range, pct, raw_json, share, table
from dundi.evaluation.figures.registry import block


def _certified_mnist10k(root: Path) -> str:
    data = raw_json(root, "certified/mnist-10k-certify.json")
    n, radii = data["count"], data["certified_accuracy"]
    header = ["L∞ eps", "0 (clean)", *radii.keys()]
    cells = [share(data["clean_accuracy"], n)] + [share(radii[eps], n) for eps in radii]
    return table(header, [[f"Certified DunDi, deployed rule n={data['n']} m={data['m']} k={data['k']}", *cells]])


SEEDS = (0, 1, 2)


def _certified_seeds(root: Path) -> str:
    """The README's certified mnist-10k recipe at three seeds (one torch thread each): every
    seed's figures, then the mean and the range across seeds."""
    runs = [raw_json(root, f"certified/seeds/cert-s{seed}-certify.json") for seed in SEEDS]
    keys = ["clean", *runs[0]["certified_accuracy"]]
    values = [[r["clean_accuracy"], *r["certified_accuracy"].values()] for r in runs]
    rows = [[f"seed {seed}", *(share(v, r["count"]) for v in vals)] for seed, r, vals in zip(SEEDS, runs, values)]
    columns = list(zip(*values))
    rows.append(["mean (range)", *(mean_range(list(c)) for c in columns)])
    n = runs[0]["count"]
    return table([f"Certified DunDi, mnist-10k, {n:,} test images, rule n={runs[0]['n']} m={runs[0]['m']} "
                   f"k={runs[0]['k']}", *(k if k == "clean" else f"certified at {k}" for k in keys)], rows)


# (row name, certify file) of the 40-epoch full-MNIST runs, trained at eps 0.4
FULL_CURVES = (("Certified DunDi, batch-mean head, sample oracles n=20 m=3 k=5", "certified/mnist-full-certify.json"),
               ("Certified DunDi, prototype head, prototypes as oracles n=2 m=2 k=5",
                "certified/mnist-full-proto40-certify.json"))


def _certified_curve(root: Path) -> str:
    """Certified accuracy against L∞ eps on the whole full-MNIST test set: the two 40-epoch
    cnn-ibp runs (one seed each), the deployed rule of each as served."""
    rows, header = [], None
    for name, rel in FULL_CURVES:
        data = raw_json(root, rel)
        radii = data["certified_accuracy"]
        header = header or ["L∞ eps", "clean", *radii.keys()]
        if list(radii) != header[2:]:
            raise DundiError(f"published figures: {rel} is certified at other radii than {header[2:]}")
        rows.append([f"{name} ({data['count']:,} images)", pct(data["clean_accuracy"]), *(pct(radii[e]) for e in radii)])
    return table(header, rows)


def _proof_and_attack(root: Path) -> str:
    """Proof (lower bound) and AutoAttack (upper bound) on the same 500 full-MNIST images."""
    evaluation = evaluation_of(raw_json(root, "certified/full-mnist-curve/report.json"))
    n = evaluation["clean_accuracy"]["count"]
    certified = sorted(evaluation["certified"], key=lambda c: c["eps"])
    header = ["L∞ eps", "clean", *[f"{c['eps']:g}" for c in certified]]
    clean = pct(evaluation["clean_accuracy"]["dundi"])
    robust = [share(c["robust_accuracy"], n) for c in certified]
    proven = [share(c["certified_accuracy"], n) for c in certified]
    gap = [f"{100 * (c['robust_accuracy'] - c['certified_accuracy']):.1f}" for c in certified]
    return table(header, [["AutoAttack robust accuracy (empirical, an upper bound)", clean, *robust],
                           ["certified accuracy (proven, a lower bound)", clean, *proven],
                           ["gap (points)", "", *gap]])


block("certified-mnist-10k")(_certified_mnist10k)
block("certified-seeds")(_certified_seeds)
block("certified-full-curve")(_certified_curve)
block("certified-proof-and-attack")(_proof_and_attack)
