"""Published figures as data: the tables of README.md and docs/results/**/README.md are rendered
from the committed raw files (report.json, *-certify.json, table1_full_test.jsonl, paper.json),
never copied by hand, so a page cannot drift from its data.

A page marks each generated table as a block::

    <!-- figures:NAME -->
    ...rendered Markdown...
    <!-- /figures -->

``python -m dundi.evaluation.figures`` rewrites every block from its raw files;
``--check`` rewrites nothing and exits 1 naming each block that differs (tests/
test_published_figures.py runs the same check). A block whose raw file is missing fails with
one line naming the file. Every rate is printed with its count (k/n) where an interval is, and
every interval is the 95% Wilson interval of that count.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

from dundi.errors import DundiError
from dundi.evaluation.results import wilson_interval
from dundi.files import atomic_write_text

RESULTS = Path("docs/results")
BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.S)
# paper.json / table1 run names -> the paper's model names (LeNet-1/4/5 are its Model1/2/3)
PAPER_NAMES = {"native1": "Native Model1 (LeNet-1)", "native4": "Native Model2 (LeNet-4)",
               "native5": "Native Model3 (LeNet-5)", "R1": "DunDi_R1", "R4": "DunDi_R2",
               "R5": "DunDi_R3", "P1": "DunDi_P1", "P4": "DunDi_P2", "P5": "DunDi_P3"}
NATIVE_COLUMN = 1  # a native run has no n: its accuracy stands in Table 1's first column, as in the paper
SIX = ("DunDi_R1", "DunDi_R2", "DunDi_R3", "DunDi_P1", "DunDi_P2", "DunDi_P3")
PAPER_ATTACKS = (("fgsm@0.3", "FGSM"), ("ifgsm-a@0.3", "iFGSM-a"), ("ifgsm-b@0.3", "iFGSM-b"),
                 ("jsma@0.1", "JSMA"))


# ---- raw files and numbers ------------------------------------------------------------------

def _raw(root: Path, rel: str) -> Path:
    path = root / RESULTS / rel
    if not path.is_file():
        raise DundiError(f"published figures: raw file {RESULTS / rel} is missing; "
                         "commit it or remove the figure that cites it")
    return path


def _json(root: Path, rel: str) -> Any:
    return json.loads(_raw(root, rel).read_text())


def _jsonl(root: Path, rel: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _raw(root, rel).read_text().splitlines() if line.strip()]


def count_of(rate: float, n: int) -> int:
    """The number of samples behind a rate over n; a rate that is no count of n is an error in
    the raw file, not something to round away."""
    k = round(rate * n)
    if abs(k - rate * n) > 1e-6 * n:
        raise DundiError(f"published figures: {rate} is not a count out of {n}")
    return k


def pct(rate: float, digits: int = 2) -> str:
    """A rate as a percentage, halves rounded up (29.35% -> 29.4%, whatever the float's last bit)."""
    return f"{100 * rate + 1e-9:.{digits}f}%"


def wilson_text(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{100 * lo + 1e-9:.1f}–{100 * hi + 1e-9:.1f}"


def share(rate: float, n: int, digits: int = 2) -> str:
    """'80.15% [78.3–81.8] (1,603/2,000)': a rate, its 95% Wilson interval and its count."""
    k = count_of(rate, n)
    return f"{pct(rate, digits)} [{wilson_text(k, n)}] ({k:,}/{n:,})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _evaluation(report: dict[str, Any], model_part: str = "") -> dict[str, Any]:
    found = [e for e in report["evaluations"] if model_part in e["model"]]
    if len(found) != 1:
        raise DundiError(f"published figures: {len(found)} evaluations match {model_part!r}")
    return found[0]


def _attack(evaluation: dict[str, Any], attack: str, threat: str, eps: float) -> dict[str, Any]:
    for row in evaluation["attacks"]:
        if row["attack"] == attack and row["threat"] == threat and abs(row["eps"] - eps) < 1e-9:
            return row
    raise DundiError(f"published figures: no {attack} {threat} eps {eps} row in {evaluation['model']}")


# ---- the blocks -----------------------------------------------------------------------------

def _autoattack(root: Path) -> str:
    """The headline question: AutoAttack on the exact rule, DunDi-AT and certified DunDi against
    a Madry-style LeNet-5, one seed each."""
    aa10k = _json(root, "autoattack/whole-split/report.json")
    cert10k = _evaluation(_json(root, "certified/whole-split/report.json"))
    full = _evaluation(_json(root, "at-full/report.json"))
    curve = _evaluation(_json(root, "certified/full-mnist-curve/report.json"))
    certify_full = _json(root, "certified/mnist-full-certify.json")
    rows = []

    def row(model: str, sample: str, clean: float, n: int, robust: float | None,
            certified: float | None, raw: str) -> None:
        rows.append([model, sample, share(clean, n),
                     f"**{share(robust, n)}**" if robust is not None else "not attacked on this sample",
                     share(certified, n) if certified is not None else "— (no proof)", f"`{raw}`"])

    at = _evaluation(aa10k, "AT5")
    madry = _evaluation(aa10k, "madry5")
    whole = "mnist-10k, whole test split"
    row("DunDi-AT (LeNet-5), exact rule k = 5", whole, at["clean_accuracy"]["dundi"], 2000,
        _attack(at, "autoattack", "adaptive", 0.3)["robust_accuracy"], None,
        "autoattack/whole-split/report.json")
    row("Madry-style LeNet-5, 40 epochs", whole, madry["clean_accuracy"]["native"], 2000,
        _attack(madry, "autoattack", "transfer", 0.3)["native_robust_accuracy"], None,
        "autoattack/whole-split/report.json")
    cert = cert10k["certified"][0]
    row("Certified DunDi (cnn-ibp), exact rule k = 5", whole, cert10k["clean_accuracy"]["dundi"],
        2000, _attack(cert10k, "autoattack", "adaptive", 0.3)["robust_accuracy"],
        cert["certified_accuracy"], "certified/whole-split/report.json")
    seeded = "full MNIST, 2,000 seeded test images"
    row("DunDi-AT (LeNet-5), exact rule k = 5", seeded, full["clean_accuracy"]["dundi"], 2000,
        _attack(full, "autoattack", "adaptive", 0.3)["robust_accuracy"], None, "at-full/report.json")
    row("Madry-style LeNet-5, 15 epochs", seeded, full["clean_accuracy"]["native"], 2000,
        _attack(full, "autoattack", "transfer", 0.3)["native_robust_accuracy"], None,
        "at-full/report.json")
    curve_cert = next(c for c in curve["certified"] if abs(c["eps"] - 0.3) < 1e-9)
    row("Certified DunDi (cnn-ibp, 40 epochs), exact rule k = 5", "full MNIST, 500 seeded test images",
        curve["clean_accuracy"]["dundi"], 500,
        _attack(curve, "autoattack", "adaptive", 0.3)["robust_accuracy"],
        curve_cert["certified_accuracy"], "certified/full-mnist-curve/report.json")
    n = certify_full["count"]
    row("Certified DunDi (cnn-ibp, 40 epochs), same run", "full MNIST, whole test set",
        certify_full["clean_accuracy"], n, None, certify_full["certified_accuracy"]["0.3"],
        "certified/mnist-full-certify.json")
    header = ["Model (one training seed, seed 0)", "Data, sample", "Clean [95% CI] (count)",
              "AutoAttack robust, L∞ 0.3 [95% CI] (count)", "Certified at L∞ 0.3", "Raw file (docs/results/)"]
    return _table(header, rows)


def _table1(root: Path, dataset_dir: str, runs: tuple[str, ...] = tuple(PAPER_NAMES), paper: bool = True) -> str:
    """The paper's Table 1: accuracy on the whole test split at n = 1, 10, 20 (runs: the run
    directory names, native1/4/5, R1/4/5, P1/4/5; paper: beside the paper's MNIST figures)."""
    lines = _jsonl(root, f"{dataset_dir}/table1_full_test.jsonl")
    published = _json(root, "paper.json")["table1_mnist"]
    by_run: dict[str, dict[int, float]] = {}
    count = lines[0]["count"]
    for line in lines:
        name = line["run"].rsplit("/", 1)[-1]
        column = line["n"] if "n" in line else NATIVE_COLUMN
        by_run.setdefault(name, {})[column] = line["accuracy"]
        count_of(line["accuracy"], line["count"])
    rows = []
    for name in runs:
        label, acc = PAPER_NAMES[name], by_run[name]
        cells = [pct(acc[n]) if n in acc else "" for n in (1, 10, 20)]
        paper_cell = " / ".join(f"{x}" for x in published[name]) + "%"
        rows.append([label, *cells] + ([paper_cell] if paper else []))
    header = [f"Model (whole test split, {count:,} images)", "n = 1", "n = 10", "n = 20"]
    return _table(header + (["Paper: n = 1 / 10 / 20"] if paper else []), rows)


def _paper_model(report: dict[str, Any], name: str) -> dict[str, Any]:
    """The evaluation of one of the paper's six models (Table 2's smaller tuple sets aside)."""
    found = [e for e in report["evaluations"] if e["model"].split(" (")[0] == name
             and ("tuples" not in e["model"] or "(360000 tuples" in e["model"])]
    if len(found) != 1:
        raise DundiError(f"published figures: {len(found)} evaluations of {name} in the report")
    return found[0]


def _fig6(root: Path, dataset_dir: str, models: tuple[str, ...] = SIX, paper: bool = True) -> str:
    """The paper's Fig. 6: defense success under its transfer protocol, each attack crafted on
    the DunDi model's own native LeNet, and the mean of the models beside the paper's."""
    report = _json(root, f"{dataset_dir}/report.json")
    rows, sums = [], [0.0] * 5
    for name in models:
        evaluation = _paper_model(report, name)
        by_attack = {key.split("@")[0]: v for key, v in report["fig6"][evaluation["model"]].items()}
        values = [by_attack[key.split("@")[0]] for key, _ in PAPER_ATTACKS]
        values.append(sum(values) / len(values))
        sums = [s + v for s, v in zip(sums, values)]
        n = evaluation["clean_accuracy"]["count"]
        rows.append([name, pct(evaluation["clean_accuracy"]["dundi"], 1) + f" ({n:,})",
                     *[pct(v, 1) for v in values]] + ([""] if paper else []))
    header = ["Model", "clean (sample)", *[label for _, label in PAPER_ATTACKS], "Average"]
    if not paper:
        return _table(header, rows)
    published = _json(root, "paper.json")["defense_success_mnist"]
    means = [f"**{pct(s / len(models), 1)}**" for s in sums]
    per = ", ".join(f"{label} {published[key.split('@')[0]]}" for key, label in PAPER_ATTACKS)
    rows.append([f"**mean of the {'six' if len(models) == 6 else len(models)}**", "", *means, f"**{published['average']}%** ({per})"])
    return _table(header + ["Paper average"], rows)


def _certified_curve(root: Path) -> str:
    """Certified accuracy against L∞ eps on the whole full-MNIST test set (one run, seed 0)."""
    data = _json(root, "certified/mnist-full-certify.json")
    n, radii = data["count"], data["certified_accuracy"]
    header = ["L∞ eps", "clean", *radii.keys()]
    cells = [pct(data["clean_accuracy"])] + [pct(radii[eps]) for eps in radii]
    return _table(header, [[f"Certified DunDi, cnn-ibp, 40 epochs ({n:,} images)", *cells]])


def _certified_mnist10k(root: Path) -> str:
    data = _json(root, "certified/mnist-10k-certify.json")
    n, radii = data["count"], data["certified_accuracy"]
    header = ["L∞ eps", "0 (clean)", *radii.keys()]
    cells = [share(data["clean_accuracy"], n)] + [share(radii[eps], n) for eps in radii]
    return _table(header, [[f"Certified DunDi, deployed rule n={data['n']} m={data['m']} k={data['k']}", *cells]])


SEEDS = (0, 1, 2)


def _certified_seeds(root: Path) -> str:
    """The README's certified mnist-10k recipe at three seeds (one torch thread each): every
    seed's figures, then the mean and the range across seeds."""
    runs = [_json(root, f"certified/seeds/cert-s{seed}-certify.json") for seed in SEEDS]
    keys = ["clean", *runs[0]["certified_accuracy"]]
    values = [[r["clean_accuracy"], *r["certified_accuracy"].values()] for r in runs]
    rows = [[f"seed {seed}", *(share(v, r["count"]) for v in vals)] for seed, r, vals in zip(SEEDS, runs, values)]
    columns = list(zip(*values))
    rows.append(["mean (range)", *(f"{pct(sum(c) / len(c))} ({pct(min(c))}–{pct(max(c))})" for c in columns)])
    n = runs[0]["count"]
    return _table([f"Certified DunDi, mnist-10k, {n:,} test images, rule n={runs[0]['n']} m={runs[0]['m']} "
                   f"k={runs[0]['k']}", *(k if k == "clean" else f"certified at {k}" for k in keys)], rows)


def _proof_and_attack(root: Path) -> str:
    """Proof (lower bound) and AutoAttack (upper bound) on the same 500 full-MNIST images."""
    evaluation = _evaluation(_json(root, "certified/full-mnist-curve/report.json"))
    n = evaluation["clean_accuracy"]["count"]
    certified = sorted(evaluation["certified"], key=lambda c: c["eps"])
    header = ["L∞ eps", "clean", *[f"{c['eps']:g}" for c in certified]]
    clean = pct(evaluation["clean_accuracy"]["dundi"])
    robust = [share(c["robust_accuracy"], n) for c in certified]
    proven = [share(c["certified_accuracy"], n) for c in certified]
    gap = [f"{100 * (c['robust_accuracy'] - c['certified_accuracy']):.1f}" for c in certified]
    return _table(header, [["AutoAttack robust accuracy (empirical, an upper bound)", clean, *robust],
                           ["certified accuracy (proven, a lower bound)", clean, *proven],
                           ["gap (points)", "", *gap]])


def _at_full(root: Path) -> str:
    evaluation = _evaluation(_json(root, "at-full/report.json"))
    n = evaluation["clean_accuracy"]["count"]
    rows = [["DunDi-AT (LeNet-5 backbone), exact rule k = 5", pct(evaluation["clean_accuracy"]["dundi"]),
             f"**{share(_attack(evaluation, 'autoattack', 'adaptive', 0.3)['robust_accuracy'], n)}**"],
            ["Madry-style LeNet-5 (15 epochs, 10-step PGD)", pct(evaluation["clean_accuracy"]["native"]),
             f"**{share(_attack(evaluation, 'autoattack', 'transfer', 0.3)['native_robust_accuracy'], n)}**"]]
    return _table([f"Model (one seed)", f"Clean (these {n:,})", "AutoAttack robust accuracy, L∞ 0.3 [95% CI] (count)"], rows)


def _linf_worst(evaluation: dict[str, Any], threat: str, eps: float, key: str = "robust_accuracy") -> float:
    """Robust accuracy under every L∞ attack up to eps, per sample (the report's worst case);
    key "native_robust_accuracy": the native model's, white-box on its own logits."""
    for row in evaluation["worst_case"]:
        if row["threat"] == threat and row["norm"] == "Linf" and row["eps"] is not None and abs(row["eps"] - eps) < 1e-9:
            return row[key]
    raise DundiError(f"published figures: no L∞ worst case for {threat} at eps {eps} in {evaluation['model']}")


def _threat_grid(root: Path, dataset_dir: str, models: tuple[str, ...], grid: tuple[float, ...],
                 native_of: str) -> str:
    """Robust accuracy per threat model along the eps grid, worst case per sample over every
    L∞ attack up to eps (PGD-40 CE and margin, and at the paper's eps its attacks); the last row
    is native_of's native LeNet-5 under the same attacks white-box on its own logits."""
    report = _json(root, f"{dataset_dir}/report.json")
    eps_text = " / ".join(f"{e:g}" for e in grid)

    def curve(evaluation: dict[str, Any], threat: str, key: str = "robust_accuracy") -> str:
        return " / ".join(f"{100 * _linf_worst(evaluation, threat, e, key) + 1e-9:.1f}" for e in grid) + "%"

    rows = []
    for name in models:
        evaluation = _paper_model(report, name)
        rows.append([name, pct(evaluation["clean_accuracy"]["dundi"], 1),
                     *[curve(evaluation, threat) for threat in ("adaptive", "feature", "transfer")]])
    native = _paper_model(report, native_of)
    rows.append([f"Native LeNet-5 (of {native_of}), white-box", pct(native["clean_accuracy"]["native"], 1),
                 curve(native, "transfer", "native_robust_accuracy"), "", ""])
    n = report["evaluations"][0]["clean_accuracy"]["count"]
    header = [f"Model ({n:,} images)", "clean", f"adaptive eps {eps_text}", f"feature eps {eps_text}",
              f"transfer eps {eps_text}"]
    return _table(header, rows)


def _table2(root: Path) -> str:
    """The paper's Table 2: DunDi_R1 against the number of training tuples (one pass each)."""
    paper = _json(root, "paper.json")["table2_mnist_r1"]
    accuracy = {line["run"].rsplit("/", 1)[-1]: line["accuracy"]
                for line in _jsonl(root, "mnist-10k/table1_full_test.jsonl") if line.get("n") == 20}
    report = _json(root, "mnist-10k/report.json")
    runs = [f"R1-tuples{t}" if t != 360000 else "R1" for t in paper["tuples"]]
    success = []
    for run in runs:
        evaluation = next(e for e in report["evaluations"] if e["model"].endswith(f", {run})"))
        values = [report["fig6"][evaluation["model"]][key] for key, _ in PAPER_ATTACKS]
        success.append(sum(values) / len(values))
    rows = [["Accuracy (whole test split, n = 20), here", *[pct(accuracy[r]) for r in runs]],
            ["Accuracy, paper", *[f"{x}%" for x in paper["accuracy"]]],
            ["Defense success (500 images, mean of 4 attacks), here", *[pct(x, 1) for x in success]],
            ["Defense success, paper", *[f"{x:.2f}%" for x in paper["defense_success"]]]]
    return _table(["Tuples", *[f"{t:,}" for t in paper["tuples"]]], rows)


AT_MODELS = (("DunDi-AT_R3, AT5 (30K tuples × 6)", "(30000 tuples, AT5)"),
             ("DunDi-AT_R3, AT5-long (60K tuples × 6)", "(60000 tuples, AT5-long)"))


def _at_transfer(root: Path) -> str:
    """DunDi-AT under the transfer protocol, crafted on the plain native LeNet-5."""
    at = _json(root, "at/report.json")
    plain = _json(root, "mnist-10k/report.json")
    rows = []
    for label, report, model in [("DunDi_R3 (plain)", plain, _paper_model(plain, "DunDi_R3")["model"]),
                                 *[(label, at, _evaluation(at, part)["model"]) for label, part in AT_MODELS]]:
        values = [report["fig6"][model][key] for key, _ in PAPER_ATTACKS]
        rows.append([label, *[pct(v, 1) for v in values], pct(sum(values) / len(values), 1)])
    return _table(["Model (500 images, one seed)", *[label for _, label in PAPER_ATTACKS], "Average"], rows)


def _at_robust(root: Path) -> str:
    """DunDi-AT against the Madry-style model at eps 0.3: each attack and the per-sample worst case."""
    at = _json(root, "at/report.json")
    plain = _paper_model(_json(root, "mnist-10k/report.json"), "DunDi_R3")
    attacks = ("pgd[loss=ce,restarts=5,steps=100]", "pgd[loss=margin,restarts=5,steps=100]",
               "pgd[alpha=0.01,loss=margin,steps=1000]", "square[steps=2000]")

    def cells(evaluation: dict[str, Any], threat: str, native: bool) -> list[str]:
        key = "native_robust_accuracy" if native else "robust_accuracy"
        rates = [_attack(evaluation, a, threat, 0.3)[key] for a in attacks]
        worst = next(w for w in evaluation["worst_case"] if w["threat"] == threat and w["eps"] == 0.3)[key]
        return [f"{pct(rates[0], 1)[:-1]} / {pct(rates[1], 1)}", pct(rates[2], 1), pct(rates[3], 1),
                f"**{share(worst, evaluation['clean_accuracy']['count'], 1)}**"]

    n = plain["clean_accuracy"]["count"]
    plain_worst = _linf_worst(plain, "adaptive", 0.3)
    madry = _evaluation(at, "madry5")
    rows = [["Native LeNet-5 (plain), white-box PGD-40", pct(plain["clean_accuracy"]["native"], 1), "", "", "",
             f"**{pct(_linf_worst(plain, 'transfer', 0.3, 'native_robust_accuracy'), 1)}**"],
            ["DunDi_R3 (plain), adaptive PGD-40", pct(plain["clean_accuracy"]["dundi"], 1), "", "", "", f"**{pct(plain_worst, 1)}**"],
            ["Madry-AT LeNet-5, white-box", pct(madry["clean_accuracy"]["native"], 1), *cells(madry, "transfer", True)]]
    for label, part in AT_MODELS:
        evaluation = _evaluation(at, part)
        rows.append([f"{label}, adaptive", pct(evaluation["clean_accuracy"]["dundi"], 1), *cells(evaluation, "adaptive", False)])
    rows.append([f"{AT_MODELS[1][0]}, feature", "", *cells(_evaluation(at, AT_MODELS[1][1]), "feature", False)])
    return _table([f"Model ({n} images, one seed)", "clean", "PGD-100×5 CE / margin", "PGD-1000", "Square",
                   "**worst case** [95% CI] (count)"], rows)


EQUAL = "certified/equal-terms"


def _aa_cells(root: Path, report: str | None, eps: float) -> tuple[str, str]:
    """AutoAttack robust accuracy of certified DunDi (adaptive, the exact rule) and of the softmax
    baseline (white-box on its logits: the transfer rows' native columns) in one evaluation;
    "not run" where the table names no evaluation for that budget."""
    if report is None:
        return "not run", "not run"
    native = _attack(_evaluation(_json(root, f"{EQUAL}/{report}/report.json")), "autoattack", "transfer", eps)
    return _aa_dundi_cell(root, report, eps), share(native["native_robust_accuracy"], native["count"])


def _aa_dundi_cell(root: Path, report: str | None, eps: float) -> str:
    """AutoAttack robust accuracy of DunDi alone (adaptive, the exact rule), or "not run"."""
    if report is None:
        return "not run"
    row = _attack(_evaluation(_json(root, f"{EQUAL}/{report}/report.json")), "autoattack", "adaptive", eps)
    return share(row["robust_accuracy"], row["count"])


# (eps trained at, run-name suffix, eps certified, AutoAttack evaluation of DunDi and softmax
# IBP, AutoAttack evaluation of DunDi with prototypes as oracles; None: not run)
EQUAL_BUDGETS = ((0.4, "", "0.3", "aa-eps0.3", "aa-proto-eps0.3"), (0.15, "-eps015", "0.1", "aa-eps0.1", "aa-proto-eps0.1"))
# (row name, certify file stem, train file stem, column of the AutoAttack cells) per budget
EQUAL_MODELS = (("Certified DunDi, sample oracles: rule n=20 m=3 k=5", "dundi-e10{}", "dundi-e10{}", 0),
                ("Certified DunDi, prototypes as oracles: n=2 m=2 k=5", "dundi-e10{}-proto-syn",
                 "dundi-e10{}-proto", 2),
                ("Softmax IBP (elided last layer)", "sm-e10{}", "sm-e10{}", 1))


def _equal_terms(root: Path) -> str:
    """Certified DunDi (its two kinds of oracle database) against the softmax IBP baseline on
    the same network, data, batches, schedule and bound code: full MNIST, the whole test set
    certified, AutoAttack on 1,000."""
    rows = []
    for eps_train, suffix, eps_cert, report, proto_report in EQUAL_BUDGETS:
        aa = (*_aa_cells(root, report, float(eps_cert)), _aa_dundi_cell(root, proto_report, float(eps_cert)))
        for name, cert_stem, train_stem, column in EQUAL_MODELS:
            cert = _json(root, f"{EQUAL}/{cert_stem.format(suffix)}-certify.json")
            train = _json(root, f"{EQUAL}/{train_stem.format(suffix)}-train.json")
            if train["config"]["cert_eps"] != eps_train:
                raise DundiError(f"published figures: {train_stem.format(suffix)} was trained at eps "
                                 f"{train['config']['cert_eps']}, the table says {eps_train}")
            n = cert["count"]
            rows.append([name, f"{eps_train:g}", share(cert["clean_accuracy"], n), f"**{eps_cert}**",
                         share(cert["certified_accuracy"][eps_cert], n), aa[column], f"{train['train_seconds']:,.0f}"])
    return _table(["Model (cnn-ibp, 512 hidden; full MNIST, 10 epochs, one seed)", "trained at eps", "clean (10,000)",
                   "L∞ eps", "certified (10,000)", "AutoAttack (1,000)", "training s"], rows)


def _equal_terms_10k(root: Path) -> str:
    """The same comparison on mnist-10k (the README's certified recipe, 60 epochs)."""
    rows = []
    for name, run in (("Certified DunDi, rule n=20 m=3 k=5", "dundi-10k"), ("Softmax IBP", "sm-10k")):
        cert, train = _json(root, f"{EQUAL}/{run}-certify.json"), _json(root, f"{EQUAL}/{run}-train.json")
        n = cert["count"]
        rows.append([name, share(cert["clean_accuracy"], n), *[share(v, n) for v in cert["certified_accuracy"].values()],
                     f"{train['train_seconds']:,.0f}"])
    radii = _json(root, f"{EQUAL}/dundi-10k-certify.json")["certified_accuracy"]
    return _table(["Model (mnist-10k, 2,000 test images, one seed)", "clean", *[f"certified at {e}" for e in radii],
                   "training s"], rows)


def _where_points_go(root: Path) -> str:
    """Certified DunDi (full MNIST, trained at 0.4) with the network fixed and the rule varied,
    then one training change, beside the softmax baseline: which part holds the gap."""
    cases = (("deployed rule: n=20 random oracles, m=3, k=5", "dundi-e10-certify.json"),
             ("step 1 switched off (k=10 keeps every class)", "diag-k10-certify.json"),
             ("n=500 random oracles (the class means, nearly)", "diag-n500-certify.json"),
             ("n=20 oracles chosen for margin (`index build --select-eps 0.3`)", "diag-margin-oracles-certify.json"),
             ("retrained with 40 images per class per batch (less noisy head)", "dundi-e10-pc40-certify.json"),
             ("retrained against learned prototypes, n=20 oracles herded toward them", "dundi-e10-proto-certify.json"),
             ("the same network, n=400 herded (a class's whole candidate pool: its mean, nearly)",
              "diag-proto-n400-certify.json"),
             ("the same network, n=20 oracles chosen for margin", "dundi-e10-proto-sel-certify.json"),
             ("the same network, the prototypes as oracles (2 per class, m=2)", "dundi-e10-proto-syn-certify.json"),
             ("softmax IBP, same network and schedule", "sm-e10-certify.json"))
    rows = []
    for label, raw in cases:
        cert = _json(root, f"{EQUAL}/{raw}")
        rows.append([label, pct(cert["clean_accuracy"]), pct(cert["certified_accuracy"]["0.1"]),
                     pct(cert["certified_accuracy"]["0.3"])])
    return _table(["Full MNIST, 10,000 test images, trained at eps 0.4", "clean", "certified at 0.1",
                   "certified at 0.3"], rows)


def _prototype_head(root: Path) -> str:
    """The prototype run's learned head beside its herded oracles, both proved by the same
    float64 interval bound (a diagnostic, prototype_head.py): what realising the head costs."""
    raw = _json(root, f"{EQUAL}/prototype-head.json")
    rows = [[name, *(pct(figures[e]) for e in ("0", "0.1", "0.3"))]
            for name, figures in raw["certified_accuracy"].items()]
    return _table([f"Head of `{raw['run']}` (full MNIST, {raw['count']:,} test images; {raw['bound']})",
                   "clean", "certified at 0.1", "certified at 0.3"], rows)


RENDERERS: dict[str, Callable[[Path], str]] = {
    "certified-equal-terms": _equal_terms,
    "certified-equal-terms-10k": _equal_terms_10k,
    "certified-where-points-go": _where_points_go,
    "certified-prototype-head": _prototype_head,
    "autoattack": _autoattack,
    "table1-mnist-10k": lambda root: _table1(root, "mnist-10k"),
    "table1-mnist": lambda root: _table1(root, "mnist"),
    "fig6-mnist-10k": lambda root: _fig6(root, "mnist-10k"),
    "fig6-mnist": lambda root: _fig6(root, "mnist"),
    "certified-mnist-10k": _certified_mnist10k,
    "certified-seeds": _certified_seeds,
    "certified-full-curve": _certified_curve,
    "certified-proof-and-attack": _proof_and_attack,
    "at-full": _at_full,
    "table2-mnist-10k": _table2,
    "threats-mnist-10k": lambda root: _threat_grid(root, "mnist-10k", ("DunDi_R1", "DunDi_R2", "DunDi_R3", "DunDi_P1", "DunDi_P2", "DunDi_P3"), (0.05, 0.1, 0.2, 0.3), "DunDi_R3"),
    "threats-fashion-mnist": lambda root: _threat_grid(root, "fashion-mnist", ("DunDi_R3", "DunDi_P3"), (0.025, 0.05, 0.1, 0.2), "DunDi_R3"),
    "at-transfer": _at_transfer,
    "table1-fashion-mnist": lambda root: _table1(root, "fashion-mnist", ("native5", "R5", "P5"), paper=False),
    "fig6-fashion-mnist": lambda root: _fig6(root, "fashion-mnist", ("DunDi_R3", "DunDi_P3"), paper=False),
    "at-robust": _at_robust,
}


# ---- intervals quoted in prose ----------------------------------------------------------------

# "80.15% [95% CI 78.3–81.8]", "**82.40%** robust white-box [80.7–84.0] (1,648/2,000)"
QUOTED = re.compile(r"(?P<p>\d{1,3}(?:\.\d+)?)%[^\[\]%|]{0,40}?\[(?:95% CI )?(?P<lo>\d{1,3}\.\d)[–-]"
                    r"(?P<hi>\d{1,3}\.\d)%?\](?: \((?P<k>[\d,]+)/(?P<n>[\d,]+)\))?")
# the test-set samples the pages publish; a quoted interval without its count must be the Wilson
# interval of one of them
SAMPLE_SIZES = (200, 256, 300, 500, 1000, 2000, 10000)


def _consistent(p: str, lo: str, hi: str, n: int, k: int | None = None) -> bool:
    digits = len(p.split(".")[1]) if "." in p else 0
    k = round(float(p) * n / 100) if k is None else k
    return pct(k / n, digits) == f"{p}%" and wilson_text(k, n) == f"{lo}–{hi}"


def interval_errors(text: str) -> list[str]:
    """Each rate quoted with a 95% interval that is not the Wilson interval of its count (the
    count beside it, else some published sample size)."""
    flat = re.sub(r"\s+", " ", text.replace("**", ""))
    errors = []
    for m in QUOTED.finditer(flat):
        if m["k"]:
            ok = _consistent(m["p"], m["lo"], m["hi"], int(m["n"].replace(",", "")), int(m["k"].replace(",", "")))
        else:
            ok = any(_consistent(m["p"], m["lo"], m["hi"], n) for n in SAMPLE_SIZES)
        if not ok:
            errors.append(m.group(0))
    return errors


# ---- pages ----------------------------------------------------------------------------------

def pages(root: Path) -> list[Path]:
    """README.md and every Markdown page under docs/ (reports written by `dundi report` hold no
    blocks and are left as they are)."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def render_text(text: str, root: Path) -> str:
    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise DundiError(f"published figures: unknown block {name!r}; known: {', '.join(RENDERERS)}")
        return match.group(1) + RENDERERS[name](root) + match.group(4)
    return BLOCK.sub(fill, text)


def stale_blocks(root: Path) -> list[str]:
    """'PAGE: NAME' for each block whose text differs from what its raw files render."""
    stale = []
    for page in pages(root):
        text = page.read_text()
        rendered = render_text(text, root)
        if rendered != text:
            old = {m["name"]: m["body"] for m in BLOCK.finditer(text)}
            new = {m["name"]: m["body"] for m in BLOCK.finditer(rendered)}
            stale += [f"{page.relative_to(root)}: {name}" for name in old if old[name] != new[name]]
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dundi.evaluation.figures",
                                     description="Render the published tables from committed raw files.")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = stale_blocks(args.root)
            for line in stale:
                print(f"stale: {line}")
            return 1 if stale else 0
        for page in pages(args.root):
            text = page.read_text()
            rendered = render_text(text, args.root)
            if rendered != text:
                atomic_write_text(page, rendered)
                print(f"rendered {page.relative_to(args.root)}")
    except DundiError as err:
        print(f"dundi: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
