"""The paper's transfer claim on the paper's terms (docs/results/mnist/README.md): one
adversarial set per attack, crafted once on Feinman et al.'s CNN (`dundi transfer`), every
DunDi model and the three native LeNets scored on the same images, beside the per-model
protocol (each DunDi model attacked through its own native LeNet, Fig. 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dundi.evaluation.figures.page_paper import PAPER_ATTACKS, PAPER_NAMES, paper_model
from dundi.evaluation.figures.raw import count_of, pct, raw_json, table, wilson_text
from dundi.evaluation.figures.registry import block

SHARED = "mnist/shared-source/transfer.json"
ORDER = ("R1", "R4", "R5", "P1", "P4", "P5", "native1", "native4", "native5")


def _cell(figures: dict[str, Any]) -> str:
    n, k = figures["count"], figures["correct"]
    return f"{pct(k / n)} [{wilson_text(k, n)}]"  # two decimals: every count of n its own figure


def _own_native_average(report: dict[str, Any], name: str) -> str:
    """The mean defense success of one DunDi model under the per-model protocol (Fig. 6)."""
    evaluation = paper_model(report, name)
    by_attack = {key.split("@")[0]: v for key, v in report["fig6"][evaluation["model"]].items()}
    values = [by_attack[key.split("@")[0]] for key, _ in PAPER_ATTACKS]
    return f"{pct(sum(values) / len(values), 1)} ({evaluation['clean_accuracy']['count']:,})"


@block("shared-source-mnist")
def _shared_source(root: Path) -> str:
    shared = raw_json(root, SHARED)
    per_model = raw_json(root, "mnist/report.json")
    attacks = [label for _, label in PAPER_ATTACKS]
    keys = [key.split("@")[0] for key, _ in PAPER_ATTACKS]
    by_run = {t["target"].rsplit("/", 1)[-1]: t for t in shared["targets"]}
    n = shared["count"]
    rows, six = [], []
    for run in ORDER:
        target = by_run[run]
        figures = [target["attacks"][key] for key in keys]
        average = sum(f["defense_success"] for f in figures) / len(figures)
        is_native = target["kind"] == "native"
        name = PAPER_NAMES[run] + (" (control)" if is_native else "")
        count_of(target["clean_accuracy"], n)
        rows.append([name, pct(target["clean_accuracy"], 1), *[_cell(f) for f in figures], f"**{pct(average, 1)}**",
                     "" if is_native else _own_native_average(per_model, PAPER_NAMES[run])])
        if not is_native:
            six.append([f["defense_success"] for f in figures] + [average])
    means = [f"**{pct(sum(col) / len(col), 1)}**" for col in zip(*six)]
    rows.append(["**mean of the six DunDi models**", "", *means, ""])
    source = {a["attack"]: a for a in shared["attacks"]}
    rows.append([f"source: {shared['source']['arch']} itself (white-box)",
                 pct(source[keys[0]]["source_clean_accuracy"], 1),
                 *[pct(source[key]["source_accuracy_adv"], 1) for key in keys], "", ""])
    header = [f"Model ({n:,} test images, seed {shared['seed']})", "clean", *attacks, "Average",
              "per-model protocol average (sample)"]
    return table(header, rows)
