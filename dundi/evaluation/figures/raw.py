"""The raw files behind the published figures and the few ways a figure is printed: every rate
with its count (k/n) where an interval is, and every interval the 95% Wilson interval of that
count. Shared by every page module (page_*.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dundi.errors import DundiError
from dundi.evaluation.results import wilson_interval

RESULTS = Path("docs/results")


def raw_path(root: Path, rel: str) -> Path:
    """docs/results/REL under root; a missing raw file is an error naming it."""
    path = root / RESULTS / rel
    if not path.is_file():
        raise DundiError(f"published figures: raw file {RESULTS / rel} is missing; "
                         "commit it or remove the figure that cites it")
    return path


def raw_json(root: Path, rel: str) -> Any:
    return json.loads(raw_path(root, rel).read_text())


def raw_jsonl(root: Path, rel: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw_path(root, rel).read_text().splitlines() if line.strip()]


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


def mean_range(values: list[float]) -> str:
    """"mean (min–max)" of rates: the spread a figure over training seeds carries."""
    return f"{pct(sum(values) / len(values))} ({pct(min(values))}–{pct(max(values))})"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def evaluation_of(report: dict[str, Any], model_part: str = "") -> dict[str, Any]:
    """The one evaluation of a report.json whose model name contains model_part."""
    found = [e for e in report["evaluations"] if model_part in e["model"]]
    if len(found) != 1:
        raise DundiError(f"published figures: {len(found)} evaluations match {model_part!r}")
    return found[0]


def attack_row(evaluation: dict[str, Any], attack: str, threat: str, eps: float) -> dict[str, Any]:
    """An evaluation's summary row of one attack setting under one threat model."""
    for row in evaluation["attacks"]:
        if row["attack"] == attack and row["threat"] == threat and abs(row["eps"] - eps) < 1e-9:
            return row
    raise DundiError(f"published figures: no {attack} {threat} eps {eps} row in {evaluation['model']}")


def linf_worst(evaluation: dict[str, Any], threat: str, eps: float, key: str = "robust_accuracy") -> float:
    """Robust accuracy under every L∞ attack up to eps, per sample (the report's worst case);
    key "native_robust_accuracy": the native model's, white-box on its own logits."""
    for row in evaluation["worst_case"]:
        if row["threat"] == threat and row["norm"] == "Linf" and row["eps"] is not None and abs(row["eps"] - eps) < 1e-9:
            return row[key]
    raise DundiError(f"published figures: no L∞ worst case for {threat} at eps {eps} in {evaluation['model']}")
