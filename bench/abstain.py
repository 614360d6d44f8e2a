"""The abstain benchmark: the MNIST-C corruptions, far-OOD and near-OOD sets, judged by
selective-classification risk, for today's rule, the nearest-oracle distance alone and the
selective rule (dundi.serving.abstain) with and without its background guard and its shape
signal (and that signal alone), each calibrated
at 1 % on held-out clean digits only; and the candidate signals of
dundi.evaluation.selective_candidates, alone and added to the selective rule.

    python bench/abstain.py RUN [RUN ...] [--limit 1000] [--raw PREFIX] [--out FILE.jsonl]
    python bench/abstain.py --raw FILE.npz [--out FILE.jsonl]     # judge saved values again

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
from dundi.evaluation.selective_candidates import CANDIDATES, REFERENCE_SIZE, candidate_values, fit_reference
from dundi.evaluation.shifts import CORRUPTIONS, DESIGN_CORRUPTIONS, corrupt, far_ood, glyphs, scan_variations
from dundi.rule.abstain_signals import abstain_flags, conformal_level, levels
from dundi.run.pipeline import held_out_images
from dundi.run.shape_fit import training_images
from dundi.serving.abstain import (EXTREMES, LEGACY_FIELDS, ensure_shape_basis, guard_thresholds, legacy_thresholds,
                                   rule_values, selective_thresholds, signal_scales)
from dundi.serving.model import LoadedModel, ModelConfig

RATE = 0.01
RULES = ("today's rule (4 signals)", "nearest-oracle distance alone", "selective rule, no background guard",
         "selective rule", "selective rule, no shape signal", "shape signal alone")
CAND = "cand:"   # raw keys of the candidate signals (dundi.evaluation.selective_candidates)


def _leveled(cal: dict, scales: dict, guards: dict) -> tuple[None, dict, dict, float]:
    """A rule withholding where a guard fires or its largest level passes the conformal level."""
    return None, scales, guards, conformal_level(levels(cal, scales), abstain_flags(cal, guards), RATE)


def calibrated(cal: dict[str, np.ndarray]) -> dict[str, tuple]:
    """rule -> (served thresholds or None, the scales ordering its confidence, its guards, its
    level), all from the held-out values ``cal``. Today's rule and the distance alone are served
    as before (order statistics deepened in turn); their confidence is their largest
    standardized level. Candidates, where measured, alone and added to the selective rule."""
    legacy, dist = legacy_thresholds(cal, RATE), legacy_thresholds(cal, RATE, ("abstain_threshold",))
    sel = selective_thresholds(cal, RATE)
    scales = {f: tuple(v) for f, v in sel["scales"].items()}
    guards = guard_thresholds(cal, EXTREMES)
    before = {f: v for f, v in sel["thresholds"].items() if f != "abstain_max_background"}
    out = {RULES[0]: (legacy, signal_scales(cal, LEGACY_FIELDS), {}, None),
           RULES[1]: (dist, signal_scales(cal, ("abstain_threshold",)), {}, None),
           RULES[2]: ({"thresholds": before, "abstain_rate": float(abstain_flags(cal, before).mean())}, scales,
                      {f: v for f, v in guards.items() if f != "abstain_max_background"}, None),
           RULES[3]: (sel, scales, guards, None)}
    if "abstain_max_shape" in cal:  # the rule without the shape signal, and the signal alone
        unshaped = selective_thresholds({f: v for f, v in cal.items() if f != "abstain_max_shape"}, RATE)
        out[RULES[4]] = (unshaped, {f: tuple(v) for f, v in unshaped["scales"].items()}, guards, None)
        out[RULES[5]] = _leveled(cal, signal_scales(cal, ("abstain_max_shape",)), {})
    for c in (c for c in CANDIDATES if CAND + c in cal):
        out[f"{c} alone"] = _leveled(cal, signal_scales(cal, (CAND + c,)), {})
        out[f"selective rule + {c}"] = _leveled(cal, {**scales, **signal_scales(cal, (CAND + c,))}, guards)
    return out


def withheld(values: dict, rule: tuple) -> np.ndarray:
    calib, scales, guards, level = rule
    if calib is not None:
        return abstain_flags(values, calib["thresholds"])
    return abstain_flags(values, guards) | (levels(values, scales) > level)


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
    for name, images in scan_variations(digits, seed=5).items():
        out[name] = (images, labels, "scan variation")
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


def group_of(set_name: str) -> str:
    if set_name == "clean test":
        return "clean"
    if set_name in CORRUPTIONS:
        return "corruption (design)" if set_name in DESIGN_CORRUPTIONS else "corruption (held out)"
    if set_name in ("contrast 70%", "gaussian noise 0.1"):
        return "scan variation"
    return "near-OOD" if set_name == "glyphs" else "far-OOD"


def reference(model: LoadedModel, data_dir: str | None):
    """The candidates' reference: REFERENCE_SIZE images of the training part of the run's train
    split (seeded), never its held-out part nor the test split."""
    images, labels = training_images(model.run.meta, REFERENCE_SIZE, data_dir)
    return fit_reference(images, labels, model.run.embed(images, model.embed_batch))


def measure(run: str, limit: int, data_dir: str | None) -> dict[str, np.ndarray]:
    """Every image's abstain signals and whether the rule's answer is right ("set/field" keys;
    "calibration/..." for the held-out images, "meta/..." for the run and the source)."""
    model = LoadedModel(ModelConfig(run=os.path.abspath(run)))
    ensure_shape_basis(model, data_dir)
    held, _, source = held_out_images(model.run, data_dir, limit=2000)
    held_result, cal = rule_values(model, held)
    digits, labels, _ = load_split(model.run.meta["dataset"], "test", data_dir, limit=limit)
    raw = {f"calibration/{f}": v for f, v in cal.items()}
    ref = reference(model, data_dir)

    def candidates(images: np.ndarray, result) -> dict[str, np.ndarray]:
        emb = model.run.embed(images, model.embed_batch)
        return {CAND + c: v for c, v in candidate_values(ref, images, emb, result.fine_scores, model.rule.n).items()}
    raw.update({f"calibration/{f}": v for f, v in candidates(held, held_result).items()})
    raw["meta/run"] = np.array(os.path.basename(os.path.normpath(run)))
    raw["meta/calibration"] = np.array(source)
    for set_name, (images, truth, _) in sets(digits, labels, data_dir).items():
        result, values = rule_values(model, images)
        raw.update({f"{set_name}/{f}": v for f, v in {**values, **candidates(images, result)}.items()})
        raw[f"{set_name}/correct"] = ((result.labels == truth) if truth is not None
                                      else np.zeros(len(images), bool))
        raw[f"{set_name}/labelled"] = np.array(truth is not None)
    return raw


def judge(raw) -> list[dict]:
    """The table rows and the AURC rows of one run's raw values (from :func:`measure` or a
    saved .npz): the rules calibrated on the held-out values, then applied to every set."""
    cal = {k.split("/", 1)[1]: raw[k] for k in raw if k.startswith("calibration/")}
    rules = calibrated(cal)
    name, source = str(raw["meta/run"]), str(raw["meta/calibration"])
    set_names = list(dict.fromkeys(k.split("/", 1)[0] for k in raw
                                   if not k.startswith(("calibration/", "meta/"))))
    rows, pooled = [], {r: ([], [], []) for r in rules}
    for set_name in set_names:
        values = {k.split("/", 1)[1]: raw[k] for k in raw if k.startswith(set_name + "/")}
        correct, group = values["correct"].astype(bool), group_of(set_name)
        for rule, (calib, scales, guards, _) in rules.items():
            flags = withheld(values, rules[rule])
            row = {"run": name, "rule": rule, "set": set_name, "group": group, **table_row(flags, correct)}
            if not bool(values.get("labelled", group not in ("far-OOD", "near-OOD"))):
                row.pop("accuracy_answering"), row.pop("accuracy_all")
            rows.append(row)
            if group.startswith("corruption"):  # the AURC's benchmark: the 15 MNIST-C kinds
                pooled[rule][0].append(confidence(values, scales, guards))
                pooled[rule][1].append(correct)
                pooled[rule][2].append(np.full(len(correct), group))
    for rule, (calib, _, _, _) in rules.items():
        score, correct, group = (np.concatenate(part) for part in pooled[rule])
        design = group == "corruption (design)"
        rows.append({"run": name, "rule": rule, "set": "all corruptions", "group": "aurc",
                     "aurc": aurc(score, correct), "aurc_design": aurc(score[design], correct[design]),
                     "aurc_held_out": aurc(score[~design], correct[~design]), "accuracy_all": float(correct.mean()),
                     "count": int(len(score)), "calibration": source,
                     "calibration_withheld": float(withheld(cal, rules[rule]).mean()),
                     "thresholds": {k: v for k, v in (calib or {"thresholds": {}})["thresholds"].items()
                                    if v is not None},
                     **curve(score, correct)})
    return rows


def print_table(rows: list[dict]) -> None:
    rules = [r for r in RULES if any(row["rule"] == r for row in rows)]  # raw files before the shape signal: 4
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
    for rule in dict.fromkeys(r["rule"] for r in rows):
        a = by[(rule, "all corruptions")]
        print(f"AURC on all corruptions, {rule}: {a['aurc']:.4f} (design {a['aurc_design']:.4f}, held out "
              f"{a['aurc_held_out']:.4f}; accuracy without abstaining "
              f"{a['accuracy_all']:.1%}, {a['count']} images; calibration withheld "
              f"{a['calibration_withheld']:.2%} of {a['calibration']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run directories to measure")
    parser.add_argument("--limit", type=int, default=1000, help="test images per set")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="write the table's raw rows here (jsonl)")
    parser.add_argument("--raw", default=None,
                        help="with runs: save every image's signal values to RAW-<run>.npz; without "
                             "runs: judge these saved files again (comma-separated) with today's code")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    if not args.runs:
        if not args.raw:
            parser.error("give run directories, or --raw FILE.npz[,FILE.npz] to judge again")
        for path in args.raw.split(","):
            part = judge(dict(np.load(path)))
            print(f"== {os.path.basename(path)}")
            print_table(part)
            rows += part
    for run in args.runs:
        start = time.monotonic()
        raw = measure(run, args.limit, args.data_dir)
        if args.raw:
            np.savez_compressed(f"{args.raw}-{raw['meta/run']}.npz", **raw)
        part = judge(raw)
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
