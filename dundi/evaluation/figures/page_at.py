"""DunDi-AT against Madry-style adversarial training (docs/results/README.md's DunDi-AT section,
docs/results/at-full/README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dundi.evaluation.figures.page_paper import PAPER_ATTACKS, paper_model
from dundi.evaluation.figures.raw import attack_row, evaluation_of, linf_worst, pct, raw_json, share, table
from dundi.evaluation.figures.registry import block


AT_MODELS = (("DunDi-AT_R3, AT5 (30K tuples × 6)", "(30000 tuples, AT5)"),
             ("DunDi-AT_R3, AT5-long (60K tuples × 6)", "(60000 tuples, AT5-long)"))


def _at_transfer(root: Path) -> str:
    """DunDi-AT under the transfer protocol, crafted on the plain native LeNet-5."""
    at = raw_json(root, "at/report.json")
    plain = raw_json(root, "mnist-10k/report.json")
    rows = []
    for label, report, model in [("DunDi_R3 (plain)", plain, paper_model(plain, "DunDi_R3")["model"]),
                                 *[(label, at, evaluation_of(at, part)["model"]) for label, part in AT_MODELS]]:
        values = [report["fig6"][model][key] for key, _ in PAPER_ATTACKS]
        rows.append([label, *[pct(v, 1) for v in values], pct(sum(values) / len(values), 1)])
    return table(["Model (500 images, one seed)", *[label for _, label in PAPER_ATTACKS], "Average"], rows)


def _at_robust(root: Path) -> str:
    """DunDi-AT against the Madry-style model at eps 0.3: each attack and the per-sample worst case."""
    at = raw_json(root, "at/report.json")
    plain = paper_model(raw_json(root, "mnist-10k/report.json"), "DunDi_R3")
    attacks = ("pgd[loss=ce,restarts=5,steps=100]", "pgd[loss=margin,restarts=5,steps=100]",
               "pgd[alpha=0.01,loss=margin,steps=1000]", "square[steps=2000]")

    def cells(evaluation: dict[str, Any], threat: str, native: bool) -> list[str]:
        key = "native_robust_accuracy" if native else "robust_accuracy"
        rates = [attack_row(evaluation, a, threat, 0.3)[key] for a in attacks]
        worst = next(w for w in evaluation["worst_case"] if w["threat"] == threat and w["eps"] == 0.3)[key]
        return [f"{pct(rates[0], 1)[:-1]} / {pct(rates[1], 1)}", pct(rates[2], 1), pct(rates[3], 1),
                f"**{share(worst, evaluation['clean_accuracy']['count'], 1)}**"]

    n = plain["clean_accuracy"]["count"]
    plain_worst = linf_worst(plain, "adaptive", 0.3)
    madry = evaluation_of(at, "madry5")
    rows = [["Native LeNet-5 (plain), white-box PGD-40", pct(plain["clean_accuracy"]["native"], 1), "", "", "",
             f"**{pct(linf_worst(plain, 'transfer', 0.3, 'native_robust_accuracy'), 1)}**"],
            ["DunDi_R3 (plain), adaptive PGD-40", pct(plain["clean_accuracy"]["dundi"], 1), "", "", "", f"**{pct(plain_worst, 1)}**"],
            ["Madry-AT LeNet-5, white-box", pct(madry["clean_accuracy"]["native"], 1), *cells(madry, "transfer", True)]]
    for label, part in AT_MODELS:
        evaluation = evaluation_of(at, part)
        rows.append([f"{label}, adaptive", pct(evaluation["clean_accuracy"]["dundi"], 1), *cells(evaluation, "adaptive", False)])
    rows.append([f"{AT_MODELS[1][0]}, feature", "", *cells(evaluation_of(at, AT_MODELS[1][1]), "feature", False)])
    return table([f"Model ({n} images, one seed)", "clean", "PGD-100×5 CE / margin", "PGD-1000", "Square",
                   "**worst case** [95% CI] (count)"], rows)


def _at_full(root: Path) -> str:
    evaluation = evaluation_of(raw_json(root, "at-full/report.json"))
    n = evaluation["clean_accuracy"]["count"]
    rows = [["DunDi-AT (LeNet-5 backbone), exact rule k = 5", pct(evaluation["clean_accuracy"]["dundi"]),
             f"**{share(attack_row(evaluation, 'autoattack', 'adaptive', 0.3)['robust_accuracy'], n)}**"],
            ["Madry-style LeNet-5 (15 epochs, 10-step PGD)", pct(evaluation["clean_accuracy"]["native"]),
             f"**{share(attack_row(evaluation, 'autoattack', 'transfer', 0.3)['native_robust_accuracy'], n)}**"]]
    return table([f"Model (one seed)", f"Clean (these {n:,})", "AutoAttack robust accuracy, L∞ 0.3 [95% CI] (count)"], rows)


block("at-transfer")(_at_transfer)
block("at-robust")(_at_robust)
block("at-full")(_at_full)
