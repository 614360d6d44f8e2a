"""The paper's section 4 on our data (docs/results/README.md, docs/results/mnist/README.md): Table 1,
Fig. 6, Table 2 and the threat models along the eps grid, beside the paper's own figures
(paper.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dundi.errors import DundiError
from dundi.evaluation.figures.raw import linf_worst, pct, raw_json, raw_jsonl, count_of, table
from dundi.evaluation.figures.registry import block


# paper.json / table1 run names -> the paper's model names (LeNet-1/4/5 are its Model1/2/3)
PAPER_NAMES = {"native1": "Native Model1 (LeNet-1)", "native4": "Native Model2 (LeNet-4)",
               "native5": "Native Model3 (LeNet-5)", "R1": "DunDi_R1", "R4": "DunDi_R2",
               "R5": "DunDi_R3", "P1": "DunDi_P1", "P4": "DunDi_P2", "P5": "DunDi_P3"}
NATIVE_COLUMN = 1  # a native run has no n: its accuracy stands in Table 1's first column, as in the paper
SIX = ("DunDi_R1", "DunDi_R2", "DunDi_R3", "DunDi_P1", "DunDi_P2", "DunDi_P3")
PAPER_ATTACKS = (("fgsm@0.3", "FGSM"), ("ifgsm-a@0.3", "iFGSM-a"), ("ifgsm-b@0.3", "iFGSM-b"),
                 ("jsma@0.1", "JSMA"))


def _table1(root: Path, dataset_dir: str, runs: tuple[str, ...] = tuple(PAPER_NAMES), paper: bool = True) -> str:
    """The paper's Table 1: accuracy on the whole test split at n = 1, 10, 20 (runs: the run
    directory names, native1/4/5, R1/4/5, P1/4/5; paper: beside the paper's MNIST figures)."""
    lines = raw_jsonl(root, f"{dataset_dir}/table1_full_test.jsonl")
    published = raw_json(root, "paper.json")["table1_mnist"]
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
    return table(header + (["Paper: n = 1 / 10 / 20"] if paper else []), rows)


def paper_model(report: dict[str, Any], name: str) -> dict[str, Any]:
    """The evaluation of one of the paper's six models (Table 2's smaller tuple sets aside)."""
    found = [e for e in report["evaluations"] if e["model"].split(" (")[0] == name
             and ("tuples" not in e["model"] or "(360000 tuples" in e["model"])]
    if len(found) != 1:
        raise DundiError(f"published figures: {len(found)} evaluations of {name} in the report")
    return found[0]


def _fig6(root: Path, dataset_dir: str, models: tuple[str, ...] = SIX, paper: bool = True) -> str:
    """The paper's Fig. 6: defense success under its transfer protocol, each attack crafted on
    the DunDi model's own native LeNet, and the mean of the models beside the paper's."""
    report = raw_json(root, f"{dataset_dir}/report.json")
    rows, sums = [], [0.0] * 5
    for name in models:
        evaluation = paper_model(report, name)
        by_attack = {key.split("@")[0]: v for key, v in report["fig6"][evaluation["model"]].items()}
        values = [by_attack[key.split("@")[0]] for key, _ in PAPER_ATTACKS]
        values.append(sum(values) / len(values))
        sums = [s + v for s, v in zip(sums, values)]
        n = evaluation["clean_accuracy"]["count"]
        rows.append([name, pct(evaluation["clean_accuracy"]["dundi"], 1) + f" ({n:,})",
                     *[pct(v, 1) for v in values]] + ([""] if paper else []))
    header = ["Model", "clean (sample)", *[label for _, label in PAPER_ATTACKS], "Average"]
    if not paper:
        return table(header, rows)
    published = raw_json(root, "paper.json")["defense_success_mnist"]
    means = [f"**{pct(s / len(models), 1)}**" for s in sums]
    per = ", ".join(f"{label} {published[key.split('@')[0]]}" for key, label in PAPER_ATTACKS)
    rows.append([f"**mean of the {'six' if len(models) == 6 else len(models)}**", "", *means, f"**{published['average']}%** ({per})"])
    return table(header + ["Paper average"], rows)


def _threat_grid(root: Path, dataset_dir: str, models: tuple[str, ...], grid: tuple[float, ...],
                 native_of: str) -> str:
    """Robust accuracy per threat model along the eps grid, worst case per sample over every
    L∞ attack up to eps (PGD-40 CE and margin, and at the paper's eps its attacks); the last row
    is native_of's native LeNet-5 under the same attacks white-box on its own logits."""
    report = raw_json(root, f"{dataset_dir}/report.json")
    eps_text = " / ".join(f"{e:g}" for e in grid)

    def curve(evaluation: dict[str, Any], threat: str, key: str = "robust_accuracy") -> str:
        return " / ".join(f"{100 * linf_worst(evaluation, threat, e, key) + 1e-9:.1f}" for e in grid) + "%"

    rows = []
    for name in models:
        evaluation = paper_model(report, name)
        rows.append([name, pct(evaluation["clean_accuracy"]["dundi"], 1),
                     *[curve(evaluation, threat) for threat in ("adaptive", "feature", "transfer")]])
    native = paper_model(report, native_of)
    rows.append([f"Native LeNet-5 (of {native_of}), white-box", pct(native["clean_accuracy"]["native"], 1),
                 curve(native, "transfer", "native_robust_accuracy"), "", ""])
    n = report["evaluations"][0]["clean_accuracy"]["count"]
    header = [f"Model ({n:,} images)", "clean", f"adaptive eps {eps_text}", f"feature eps {eps_text}",
              f"transfer eps {eps_text}"]
    return table(header, rows)


def _table2(root: Path) -> str:
    """The paper's Table 2: DunDi_R1 against the number of training tuples (one pass each)."""
    paper = raw_json(root, "paper.json")["table2_mnist_r1"]
    accuracy = {line["run"].rsplit("/", 1)[-1]: line["accuracy"]
                for line in raw_jsonl(root, "mnist-10k/table1_full_test.jsonl") if line.get("n") == 20}
    report = raw_json(root, "mnist-10k/report.json")
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
    return table(["Tuples", *[f"{t:,}" for t in paper["tuples"]]], rows)


block("table1-mnist-10k")(lambda root: _table1(root, "mnist-10k"))
block("table1-mnist")(lambda root: _table1(root, "mnist"))
block("table1-fashion-mnist")(lambda root: _table1(root, "fashion-mnist", ("native5", "R5", "P5"), paper=False))
block("fig6-mnist-10k")(lambda root: _fig6(root, "mnist-10k"))
block("fig6-mnist")(lambda root: _fig6(root, "mnist"))
block("fig6-fashion-mnist")(lambda root: _fig6(root, "fashion-mnist", ("DunDi_R3", "DunDi_P3"), paper=False))
block("table2-mnist-10k")(_table2)
block("threats-mnist-10k")(lambda root: _threat_grid(root, "mnist-10k", SIX, (0.05, 0.1, 0.2, 0.3), "DunDi_R3"))
block("threats-fashion-mnist")(lambda root: _threat_grid(root, "fashion-mnist", ("DunDi_R3", "DunDi_P3"), (0.025, 0.05, 0.1, 0.2), "DunDi_R3"))
