"""The abstain benchmark: the MNIST-C corruptions, far-OOD and near-OOD sets, judged by
selective-classification risk, for today's rule, the nearest-oracle distance alone and the
selective rule (dundi.serving.abstain), each calibrated at 1 % on held-out clean digits only.

    python bench/abstain.py RUN [RUN ...] [--limit 1000] [--out docs/results/abstain/bench.jsonl]

For each run: the rules are calibrated on the run's held-out images (the validation part of
its train split, never the test split); then every set is made from the first --limit images
of the run's test split (corruptions seeded per kind, dundi.evaluation.shifts) and judged.
Prints the per-set table and writes one JSON line per (run, rule, set), plus one line per
(run, rule) with the AURC over the whole corruption benchmark and its risk-coverage curve.
Corruptions marked "design" were looked at while choosing the signals; the others were not.
Render the table and the plot with docs/results/abstain/render.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from dundi.data import load_split
from dundi.errors import DundiError
from dundi.evaluation.selective import aurc, confidence, risk_coverage, table_row
from dundi.evaluation.shifts import CORRUPTIONS, DESIGN_CORRUPTIONS, corrupt, far_ood, glyphs
from dundi.rule.abstain_signals import abstain_flags
from dundi.run.pipeline import held_out_images
from dundi.serving.abstain import GUARDS, LEGACY_FIELDS, SELECTIVE_FIELDS, rule_values, thresholds_for
from dundi.serving.model import LoadedModel, ModelConfig

RATE = 0.01
RULES = {"today's rule (4 signals)": (LEGACY_FIELDS, {}),
         "nearest-oracle distance alone": (("abstain_threshold",), {}),
         "selective rule": (SELECTIVE_FIELDS, GUARDS)}
CURVE_POINTS = 101


def fashion(limit: int, data_dir: str | None) -> np.ndarray | None:
    """Fashion-MNIST test images where the data cache holds them, else None (said on stderr)."""
    try:
        return load_split("fashion-mnist", "test", data_dir, limit=limit)[0]
    except (DundiError, OSError) as exc:
        print(f"fashion-mnist left out: {exc}", file=sys.stderr)
        return None


def sets(digits: np.ndarray, labels: np.ndarray, data_dir: str | None) -> dict[str, tuple]:
    """name -> (images, labels or None, group) for every set of the benchmark."""
    out = {"clean test": (digits, labels, "clean")}
    for i, kind in enumerate(CORRUPTIONS):
        group = "corruption (design)" if kind in DESIGN_CORRUPTIONS else "corruption (held out)"
        out[kind] = (corrupt(digits, kind, seed=1000 + i), labels, group)
    for name, images in far_ood(digits, seed=7, fashion=fashion(len(digits), data_dir)).items():
        out[name] = (images, None, "far-OOD")
    out["glyphs"] = (glyphs(len(digits), seed=11), None, "near-OOD")
    return out


def curve(score: np.ndarray, correct: np.ndarray) -> dict:
    """The risk-coverage curve at CURVE_POINTS coverages (risk of the step holding each)."""
    coverage, risk = risk_coverage(score, correct)
    grid = np.linspace(0.01, 1.0, CURVE_POINTS)
    at = np.minimum(np.searchsorted(coverage, grid - 1e-12), len(coverage) - 1)
    return {"coverage": grid.round(4).tolist(), "risk": risk[at].round(5).tolist()}


def measure(run: str, limit: int, data_dir: str | None) -> list[dict]:
    model = LoadedModel(ModelConfig(run=os.path.abspath(run)))
    held, held_labels, source = held_out_images(model.run, data_dir, limit=2000)
    _, cal = rule_values(model, held)
    digits, labels, _ = load_split(model.run.meta["dataset"], "test", data_dir, limit=limit)
    rules = {name: thresholds_for(cal, RATE, fields, guards) for name, (fields, guards) in RULES.items()}
    name = os.path.basename(os.path.normpath(run))
    rows, pooled = [], {r: ([], []) for r in RULES}
    for set_name, (images, truth, group) in sets(digits, labels, data_dir).items():
        result, values = rule_values(model, images)
        correct = (result.labels == truth) if truth is not None else np.zeros(len(images), bool)
        for rule, (fields, guards) in RULES.items():
            flags = abstain_flags(values, rules[rule]["thresholds"])
            row = {"run": name, "rule": rule, "set": set_name, "group": group, **table_row(flags, correct)}
            if truth is None:
                row.pop("accuracy_answering"), row.pop("accuracy_all")
            rows.append(row)
            if group.startswith("corruption"):
                pooled[rule][0].append(confidence(cal, values, fields, guards))
                pooled[rule][1].append(correct)
    for rule, (fields, guards) in RULES.items():
        score, correct = np.concatenate(pooled[rule][0]), np.concatenate(pooled[rule][1])
        rows.append({"run": name, "rule": rule, "set": "all corruptions", "group": "aurc",
                     "aurc": aurc(score, correct), "accuracy_all": float(correct.mean()),
                     "count": int(len(score)), "calibration": source,
                     "calibration_withheld": rules[rule]["abstain_rate"],
                     "thresholds": {k: v for k, v in rules[rule]["thresholds"].items() if v is not None},
                     **curve(score, correct)})
    return rows


def print_table(rows: list[dict]) -> None:
    rules = list(RULES)
    print(f"{'set':<22} {'group':<22} " + " ".join(f"{r[:24]:>26}" for r in rules))
    print(f"{'':<22} {'':<22} " + " ".join(f"{'withheld acc.ans acc.all':>26}" for _ in rules))
    by = {(r["rule"], r["set"]): r for r in rows}
    for s in dict.fromkeys(r["set"] for r in rows if r["group"] != "aurc"):
        cells = []
        for rule in rules:
            r = by[(rule, s)]
            acc = (f"{r['accuracy_answering']:7.1%} {r['accuracy_all']:7.1%}" if "accuracy_all" in r
                   else f"{'-':>7} {'-':>7}")
            cells.append(f"{r['withheld']:8.1%} {acc:>17}")
        print(f"{s:<22} {by[(rules[0], s)]['group']:<22} " + " ".join(f"{c:>26}" for c in cells))
    for rule in rules:
        a = by[(rule, "all corruptions")]
        print(f"AURC on all corruptions, {rule}: {a['aurc']:.4f} (accuracy without abstaining "
              f"{a['accuracy_all']:.1%}, {a['count']} images; calibration withheld "
              f"{a['calibration_withheld']:.2%} of {a['calibration']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--limit", type=int, default=1000, help="test images per set")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="write the raw rows here (jsonl)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for run in args.runs:
        start = time.monotonic()
        part = measure(run, args.limit, args.data_dir)
        print(f"== {run} ({time.monotonic() - start:.0f} s)")
        print_table(part)
        rows += part
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
