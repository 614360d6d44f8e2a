"""Summaries of an evaluation's rows: clean accuracy, per-attack figures, the worst case over
attacks per sample, sanity checks, and :func:`summarize` (what ``dundi evaluate --json`` and the
report print).

Two robustness figures are computed from the rows, and every summary carries both:

- ``defense_success`` — the paper's "defense success rate" (section 4.3): correctly predicted
  adversarial samples over all adversarial samples, one adversarial sample per evaluated test
  image (the paper's 40,000 = 4 attacks × 10,000). A test image DunDi already misclassifies
  clean can count as a success if the attack happens to move it to the right class.
- ``robust_accuracy`` — the usual figure: the sample is classified correctly both clean and
  adversarially. Worst case over attacks: correct clean and under every attack.

Nothing here imports Ray or pandas: summaries are numpy over Arrow columns.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from dundi.errors import DundiError
from dundi.evaluation.results import cost, finished_shards, read_evaluation, read_results, wilson_interval

ZERO_GRAD = 1e-12  # a gradient norm at or below this counts as zero (as dundi.attacks.checks)

# ---- summaries -----------------------------------------------------------------------------

def _col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def _rate(mask: np.ndarray) -> float:
    return float(mask.mean()) if len(mask) else float("nan")


def _interval(mask: np.ndarray) -> list[float]:
    return list(wilson_interval(int(mask.sum()), int(len(mask))))


def _native_rate(mask: np.ndarray, native_clean: np.ndarray) -> float:
    """A rate about the native model: NaN when the evaluation had no native run (its
    predictions are stored as -1)."""
    return _rate(mask[native_clean >= 0])


def clean_accuracy(table: pa.Table) -> dict[str, Any]:
    """Clean accuracy of the native model and of DunDi (at n and at every n of n_values) over
    the distinct evaluated samples. Clean predictions repeat on every row of a sample; they
    must agree, which is checked."""
    if table.num_rows == 0:
        return {"count": 0, "native": float("nan"), "dundi": float("nan"), "dundi_at_n": {}}
    ids = _col(table, "sample_id")
    _, first = np.unique(ids, return_index=True)
    label = _col(table, "label")
    for name in ("native_clean", "dundi_clean"):
        col = _col(table, name)
        order = np.argsort(ids, kind="stable")
        sorted_ids, sorted_col = ids[order], col[order]
        same = sorted_ids[1:] == sorted_ids[:-1]
        if np.any(sorted_col[1:][same] != sorted_col[:-1][same]):
            raise DundiError(f"clean predictions ({name}) differ between rows of one sample")
    n_values = table.column("n_values")[int(first[0])].as_py()
    at_n = np.array(table.column("dundi_clean_at_n").take(pa.array(first)).to_pylist(), dtype=np.int64)
    lab = label[first]
    return {"count": int(len(first)),
            "native": _native_rate(_col(table, "native_clean")[first] == lab, _col(table, "native_clean")[first]),
            "dundi": _rate(_col(table, "dundi_clean")[first] == lab),
            "dundi_ci95": _interval(_col(table, "dundi_clean")[first] == lab),
            "dundi_at_n": {int(n): _rate(at_n[:, i] == lab) for i, n in enumerate(n_values)},
            "n": int(_col(table, "n")[first[0]]), "m": int(_col(table, "m")[first[0]]),
            "k": int(_col(table, "k")[first[0]])}


def _groups(table: pa.Table, names: Iterable[str]) -> dict[tuple, np.ndarray]:
    """Row indices grouped by the values of the given columns (insertion order is sorted)."""
    cols = [table.column(n).to_pylist() for n in names]
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(*cols)):
        groups.setdefault(key, []).append(i)
    return {k: np.array(v, dtype=np.int64) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def attack_summary(table: pa.Table) -> list[dict[str, Any]]:
    """One dict per (threat, attack, eps): every figure with what it was measured under.

    defense_success            paper §4.3: DunDi correct on the adversarial input, over all
    robust_accuracy            DunDi correct clean and adversarially, over all
    native_robust_accuracy     the native model, same definition
    defense_success_fooled     DunDi correct, over samples whose adversarial input fooled the
                               native model (which it classified correctly clean)
    attack_success_rate        the target model misclassifies the adversarial input
    mean_l0 / mean_l2 / mean_linf   perturbation size over the samples the attack flipped on
                               its target (target correct clean, wrong adversarially)
    """
    rows = []
    label = _col(table, "label")
    native_clean, native_adv = _col(table, "native_clean"), _col(table, "native_adv")
    dundi_clean, dundi_adv = _col(table, "dundi_clean"), _col(table, "dundi_adv")
    success = _col(table, "attack_success").astype(bool)
    for (threat, attack, eps), idx in _groups(table, ("threat", "attack", "eps")).items():
        y = label[idx]
        fooled = (native_clean[idx] == y) & (native_adv[idx] != y)
        first = int(idx[0])
        # perturbation sizes over the samples the attack flipped on its target (correct clean,
        # wrong adversarially); already-misclassified samples carry no information about them
        changed = success[idx] & (_col(table, "target_clean")[idx] == y)
        rows.append({
            "threat": threat, "attack": attack, "eps": eps,
            "norm": table.column("norm")[first].as_py(),
            "steps": int(table.column("steps")[first].as_py()),
            "target_model": table.column("target_model")[first].as_py(),
            "attack_params": json.loads(table.column("attack_params")[first].as_py()),
            "dataset": table.column("dataset")[first].as_py(),
            "split": table.column("split")[first].as_py(),
            "n": int(table.column("n")[first].as_py()), "m": int(table.column("m")[first].as_py()),
            "k": int(table.column("k")[first].as_py()),
            "count": int(len(idx)),
            "clean_accuracy_native": _native_rate(native_clean[idx] == y, native_clean[idx]),
            "clean_accuracy_dundi": _rate(dundi_clean[idx] == y),
            "defense_success": _rate(dundi_adv[idx] == y),
            "robust_accuracy": _rate((dundi_clean[idx] == y) & (dundi_adv[idx] == y)),
            "robust_accuracy_ci95": _interval((dundi_clean[idx] == y) & (dundi_adv[idx] == y)),
            "native_robust_accuracy": _native_rate((native_clean[idx] == y) & (native_adv[idx] == y),
                                                   native_clean[idx]),
            "native_fooled": int(fooled.sum()),
            "defense_success_fooled": _rate(dundi_adv[idx][fooled] == y[fooled]),
            "attack_success_rate": _rate(success[idx]),
            "flipped": int(changed.sum()),
            "mean_steps_used": float(_col(table, "steps_used")[idx].mean()),
            "mean_l0": float(_col(table, "l0")[idx][changed].mean()) if changed.any() else float("nan"),
            "mean_l2": float(_col(table, "l2")[idx][changed].mean()) if changed.any() else float("nan"),
            "mean_linf": float(_col(table, "linf")[idx][changed].mean()) if changed.any() else float("nan"),
            "zero_gradient_fraction": _rate(_col(table, "grad_norm")[idx] <= ZERO_GRAD),
            "rule_disagreement": rule_disagreement(table, idx, threat),
        })
    return rows


# Threat models whose attacked model stands in for DunDi's two-step rule itself: their label
# on the adversarial input (target_adv) should be the rule's (dundi_adv).
RULE_STAND_INS = ("adaptive",)
DISAGREEMENT_LIMIT = 0.01


def rule_disagreement(table: pa.Table, idx: np.ndarray, threat: str) -> float:
    """How often the attacked stand-in's label differs from the deployed rule's on the
    adversarial inputs (NaN for threat models that attack something else)."""
    if threat not in RULE_STAND_INS:
        return float("nan")
    return _rate(_col(table, "target_adv")[idx] != _col(table, "dundi_adv")[idx])


def _robust_flags(table: pa.Table, idx: np.ndarray, model: str) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids, per-row robust flag) of the rows ``idx`` for "dundi" or "native"."""
    y = _col(table, "label")[idx]
    ok = (_col(table, f"{model}_clean")[idx] == y) & (_col(table, f"{model}_adv")[idx] == y)
    return _col(table, "sample_id")[idx], ok


def worst_case(table: pa.Table) -> list[dict[str, Any]]:
    """Robust accuracy worst-case over attacks, per sample (auto-attack's ``robust_flags``):
    a sample counts as robust only if it is classified correctly clean and under every attack
    of the group. Groups: (threat, norm, eps) — attacks of one norm with a budget up to eps
    (an adversarial input within a smaller ball is within the larger one, so the curve cannot
    rise with eps when a weaker large-eps attack misses what a small-eps one found) — and
    (threat, "any") — every attack and budget evaluated under that threat model. Only samples
    evaluated by every attack of a group are counted; ``count`` says how many."""
    out = []
    norm = _col(table, "norm").astype(str)
    eps = _col(table, "eps")
    threat = _col(table, "threat").astype(str)
    attack = _col(table, "attack").astype(str)
    groups: list[tuple[tuple, np.ndarray]] = []
    for t in sorted(set(threat)):
        for nm in sorted(set(norm[threat == t])):
            for e in sorted(set(eps[(threat == t) & (norm == nm)])):
                groups.append(((t, nm, float(e)), np.flatnonzero((threat == t) & (norm == nm) & (eps <= e))))
        groups.append(((t, "any", float("nan")), np.flatnonzero(threat == t)))
    for (t, nm, e), idx in groups:
        settings = sorted({(str(a), float(x)) for a, x in zip(attack[idx], eps[idx])})
        figures = {}
        for model in ("dundi", "native"):
            ids, ok = _robust_flags(table, idx, model)
            per_sample: dict[int, list[bool]] = {}
            for i, flag in zip(ids.tolist(), ok.tolist()):
                per_sample.setdefault(i, []).append(flag)
            complete = [flags for flags in per_sample.values() if len(flags) == len(settings)]
            robust = np.array([all(f) for f in complete], dtype=bool)
            figures[model] = _rate(robust)
            figures[f"{model}_ci"] = _interval(robust)
            if model == "native" and not (_col(table, "native_clean")[idx] >= 0).any():
                figures[model] = float("nan")  # no native run in this evaluation
            figures["count"] = len(complete)
        out.append({"threat": str(t), "norm": str(nm), "eps": e, "attacks": [str(a) for a, _ in settings],
                    "settings": [f"{a}@{x:g}" for a, x in settings], "count": figures["count"],
                    "robust_accuracy": figures["dundi"], "robust_accuracy_ci95": figures["dundi_ci"],
                    "native_robust_accuracy": figures["native"]})
    return out


def attack_base(label: str) -> str:
    """The registry name of an attack label: ``pgd`` for ``pgd[loss=margin,steps=100]``."""
    return label.split("[")[0]


def checks(summary: list[dict[str, Any]], zero_grad_limit: float = 0.05,
           black_box: str = "square") -> list[str]:
    """Warnings in the spirit of auto-attack's checks: gradients that vanish on the attacked
    model (gradient masking makes white-box numbers meaningless), a stand-in that disagrees
    with the deployed rule on more than 1% of the adversarial inputs, and a black-box attack that
    beats every white-box attack at the same threat model, norm and budget (the white-box
    attacks are then not working and their figures overstate robustness)."""
    def is_black_box(row: dict) -> bool:  # "square" or a variant such as "square[steps=2000]"
        return attack_base(row["attack"]) == black_box

    warnings = []
    for row in summary:
        if not is_black_box(row) and row["zero_gradient_fraction"] > zero_grad_limit:
            warnings.append(
                f"{row['threat']}/{row['attack']}@{row['eps']:g}: the loss gradient is exactly zero "
                f"for {row['zero_gradient_fraction']:.0%} of the samples on {row['target_model']} — "
                f"gradient masking; its robustness figure is not trustworthy")
    for row in summary:
        if row.get("rule_disagreement", 0) > DISAGREEMENT_LIMIT:  # NaN compares False
            warnings.append(
                f"{row['threat']}/{row['attack']}@{row['eps']:g}: the attacked stand-in's label differs "
                f"from the two-step rule's on {row['rule_disagreement']:.1%} of the adversarial inputs "
                f"(above {DISAGREEMENT_LIMIT:.0%}): the attack optimised something the rule does not decide")
    by_setting: dict[tuple, list[dict]] = {}
    for row in summary:
        by_setting.setdefault((row["threat"], row["norm"], row["eps"]), []).append(row)
    for (threat, norm, eps), rows in by_setting.items():
        bb = [r for r in rows if is_black_box(r)]
        wb = [r for r in rows if not is_black_box(r)]
        if bb and wb:
            best_wb = min(wb, key=lambda r: r["robust_accuracy"])
            if bb[0]["robust_accuracy"] < best_wb["robust_accuracy"] - 1e-9:
                warnings.append(
                    f"{threat} {norm} eps={eps:g}: the black-box {bb[0]['attack']} attack brings robust "
                    f"accuracy to {bb[0]['robust_accuracy']:.2%}, below the best white-box attack "
                    f"({best_wb['attack']}: {best_wb['robust_accuracy']:.2%}) — the white-box "
                    f"attacks are failing (masked gradients or too few steps)")
    return warnings


def sample(evaluation: dict) -> dict[str, Any]:
    """Which samples the figures rest on: how many of the split, and how they were chosen."""
    count, size = evaluation.get("samples"), evaluation.get("split_size")
    return {"dataset": evaluation.get("dataset"), "split": evaluation.get("split"), "samples": count,
            "split_size": size, "seed": evaluation.get("config", {}).get("seed"),
            "selection": "whole split" if count == size else "seeded random choice"}


def summarize(out: str | os.PathLike) -> dict[str, Any]:
    """Everything `dundi evaluate --json` and the report print for one evaluation directory."""
    evaluation = read_evaluation(out)
    table = read_results(out)
    summary = attack_summary(table)
    return {"results": str(out), "dataset": evaluation.get("dataset"), "sample": sample(evaluation),
            "cost": cost(out),
            "rows": table.num_rows, "shards_planned": len(evaluation["plan"]),
            "shards_finished": len(set(finished_shards(out, evaluation["fingerprint"])) & set(evaluation["plan"])),
            "clean_accuracy": clean_accuracy(table), "attacks": summary,
            "worst_case": worst_case(table), "warnings": checks(summary),
            "model": evaluation.get("model", {})}


__all__ = ["clean_accuracy", "attack_summary", "worst_case", "checks", "attack_base", "sample", "summarize",
           "rule_disagreement", "DISAGREEMENT_LIMIT"]
