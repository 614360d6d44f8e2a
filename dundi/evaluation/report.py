"""The evaluation report: Markdown tables and PNG plots from one or more evaluation
directories (`dundi report RESULTS... --out DIR`).

Sections, each stating the dataset, the evaluated sample count, clean accuracy, every attack
setting (norm, eps, steps) and the threat model:

- Table 1   accuracy vs number of oracles n (the paper's Table 1) — clean, on the evaluated
            sample; native models in the n = 1 column only, as in the paper.
- Fig. 6    defense success rate per attack and model (transfer threat model: the paper's).
- Table 2   accuracy and defense success vs number of training tuples.
- Fig. 7    defense success rate vs n per attack and model.
- Robustness per threat model: robust accuracy vs eps per attack, worst case over attacks per
            sample, clean accuracy beside; plus the checks' warnings.

"Defense success rate" is the paper's (section 4.3): correctly classified adversarial samples
over all adversarial samples, one per evaluated test image. It is not robust accuracy: a sample
DunDi misclassifies clean counts if the attack happens to fix it. Robust accuracy (correct
clean and adversarially; worst case: under every attack) is printed beside it wherever
robustness is claimed. Plots (matplotlib, Agg canvas) are drawn in :mod:`dundi.evaluation.report_plots`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dundi.evaluation.report_plots import budget, eps_text, pct, plot_defense_bars, plot_defense_vs_n, plot_robust_vs_eps
from dundi.evaluation.results import json_safe, read_evaluation, read_results, repo_relative
from dundi.evaluation.summary import attack_summary, checks, clean_accuracy, worst_case
from dundi.files import atomic_write_json, atomic_write_text

REPORT_FILE = "report.md"
THREAT_TEXT = {
    "transfer": "transfer — crafted on the native model's logits, then classified by DunDi (the per-model reading of the paper's transfer protocol; `dundi transfer` runs the shared-source one)",
    "adaptive": "adaptive — white-box on DunDi's two-step rule as deployed (a differentiable stand-in whose argmax is Algorithm 1 at the evaluation's n, m, k; success judged by the rule itself)",
    "adaptive-all": "adaptive-all — white-box on DunDi's per-class score over all classes (mean distance to the n oracles of each class; the rule only when k = C)",
    "feature": "feature — white-box on DunDi's embedding, pulling f(x) towards the nearest oracles of another class",
}


class Evaluation:
    """One evaluation directory, loaded: its configuration, rows and summaries."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = read_evaluation(path)
        self.table = read_results(path)
        self.model = self.meta.get("model", {})
        self.native = self.meta.get("native", {})
        self.name = self.model.get("name", self.path.name)
        self.dataset = self.meta.get("dataset")
        self.clean = clean_accuracy(self.table)
        self.attacks = attack_summary(self.table)
        self.worst = worst_case(self.table)
        self.warnings = checks(self.attacks)
        from dundi.evaluation.certified_eval import certified_summary

        self.certified = certified_summary(path) or []  # per L∞ eps; empty for uncertified runs

    def scope(self) -> str:
        """Dataset, split and sample count of every number from this evaluation."""
        c = self.clean
        return (f"{self.dataset}, {self.meta.get('split', 'test')} split, {c['count']:,} of "
                f"{self.meta.get('split_size', 0):,} samples (seeded random selection)")

    def two_step(self) -> str:
        c = self.clean
        return f"two-step n = {c.get('n')}, m = {c.get('m')}, k = {c.get('k')}"

    def rows(self, threat: str) -> list[dict]:
        return [r for r in self.attacks if r["threat"] == threat]

    def defense_at_n(self, threat: str = "transfer") -> dict[tuple[str, float], dict[int, float]]:
        """Defense success rate at every n of n_values, per (attack, eps)."""
        t = self.table
        out: dict[tuple[str, float], dict[int, float]] = {}
        if t.num_rows == 0:
            return out
        threat_col = np.array(t.column("threat").to_pylist())
        attack = np.array(t.column("attack").to_pylist())
        eps = t.column("eps").to_numpy()
        label = t.column("label").to_numpy()
        n_values = t.column("n_values")[0].as_py()
        at_n = np.array(t.column("dundi_adv_at_n").to_pylist(), dtype=np.int64)
        for a in sorted(set(attack[threat_col == threat])):
            for e in sorted(set(eps[(threat_col == threat) & (attack == a)])):
                sel = (threat_col == threat) & (attack == a) & (eps == e)
                out[(str(a), float(e))] = {int(n): float((at_n[sel, i] == label[sel]).mean())
                                           for i, n in enumerate(n_values)}
        return out


def _settings_lines(rows: list[dict]) -> list[str]:
    """One line per attack setting: norm, eps, steps, every parameter, target model."""
    seen, lines = set(), []
    for r in rows:
        key = (r["threat"], r["attack"], r["eps"])
        if key in seen:
            continue
        seen.add(key)
        params = {k: v for k, v in r["attack_params"].items()
                  if k not in ("class", "threat_target", "name", "norm", "seed")}
        shown = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
        if "seed" in r["attack_params"]:
            shown += ", seeded per shard"
        lines.append(f"- `{r['attack']}` ({r['threat']}): norm {r['norm']}, {budget(r['norm'], r['eps'])}, "
                     f"steps {r['steps']} (mean used {r['mean_steps_used']:.1f}); {shown}; "
                     f"attacked model: {r['target_model']}")
    return lines


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(row) + " |" for row in body]


# ---- the report ----------------------------------------------------------------------------

def _paper_rows(ev: "Evaluation") -> list[dict]:
    """The transfer rows the paper's figures use: its four attacks at their settings when the
    evaluation has them (other transfer attacks, e.g. PGD curves, go to the per-threat section),
    else every transfer row."""
    from dundi.evaluation.config import PAPER_ATTACKS
    from dundi.evaluation.summary import attack_base

    rows = ev.rows("transfer")
    return [r for r in rows if attack_base(r["attack"]) in PAPER_ATTACKS] or rows


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower()


def _intro(datasets: list[str]) -> list[str]:
    return ["# DunDi adversarial evaluation", "",
            f"Dataset(s): {', '.join(datasets)}. Every number below names its dataset, the evaluated "
            f"sample, the clean accuracy, the attack (norm, eps, steps) and the threat model.", ""]


def _definitions(evals: list[Evaluation]) -> list[str]:
    threats = sorted({r["threat"] for ev in evals for r in ev.attacks})
    return ["Threat models:", *[f"- {THREAT_TEXT[t]}" for t in threats if t in THREAT_TEXT], "",
            "Defense success rate = correctly classified adversarial samples / all adversarial "
            "samples (one per evaluated test image), as in the paper (§4.3). Robust accuracy = "
            "correct on the clean and on the adversarial input; worst case = correct clean and "
            "under every attack of the group, per sample.", ""]


def summary_rows(ev: Evaluation) -> list[dict[str, Any]]:
    """The summary's rows for one evaluation: per threat model and budget, the worst case over
    its attacks (summary.worst_case), with the certified accuracy at that L∞ eps when the run
    has certificates; certificates at an eps no attack used get rows of their own."""
    certified = {float(c["eps"]): c for c in ev.certified}
    budgets = {t: sum(1 for w in ev.worst if w["threat"] == t and w["norm"] != "any") for t in
               {w["threat"] for w in ev.worst}}
    rows = []
    for w in ev.worst:
        if w["norm"] == "any" and budgets[w["threat"]] <= 1:  # the same samples as its one budget
            continue
        cert = certified.get(float(w["eps"])) if w["norm"] == "Linf" else None
        rows.append({"model": ev.name, "dataset": ev.dataset, "count": w["count"],
                     "clean_accuracy": ev.clean["dundi"], "threat": w["threat"], "norm": w["norm"],
                     "eps": w["eps"], "robust_accuracy": w["robust_accuracy"],
                     "certified_accuracy": cert["certified_accuracy"] if cert else None})
    attacked = {float(w["eps"]) for w in ev.worst if w["norm"] == "Linf"}
    for e, c in sorted(certified.items()):
        if e not in attacked:
            rows.append({"model": ev.name, "dataset": ev.dataset, "count": c["count"],
                         "clean_accuracy": ev.clean["dundi"], "threat": None, "norm": "Linf", "eps": e,
                         "robust_accuracy": None, "certified_accuracy": c["certified_accuracy"]})
    return rows


def _summary(evals: list[Evaluation]) -> tuple[list[str], list[dict]]:
    """The report's first table: what matters, per model, before any of the paper's figures."""
    rows = [r for ev in evals for r in summary_rows(ev)]
    md = ["## Summary", "",
          "Per model: clean accuracy, the **worst case over every attack** run under each threat model "
          "at each budget (a sample counts only if it survives all of them), certified accuracy where "
          "the run is certifiable, and the number of evaluated samples. The sections after it "
          "reproduce the paper's figures (transfer threat model: attacks crafted on another model) "
          "and list every attack.", ""]
    size = {ev.name: ev.meta.get("split_size", 0) for ev in evals}
    body = [[r["model"], r["dataset"], f"{r['count']:,} of {size[r['model']]:,}", pct(r["clean_accuracy"]), r["threat"] or "— (proof)",
             "all attacks" if r["norm"] == "any" else f"{r['norm']} {budget(r['norm'], r['eps'])}",
             pct(r["robust_accuracy"]), pct(r["certified_accuracy"])] for r in rows]
    md += _table(["Model", "Dataset", "Samples", "Clean acc.", "Threat model", "Budget",
                  "Worst-case robust acc.", "Certified acc."], body) + [""]
    return md, rows


def _evaluations_table(evals: list[Evaluation]) -> list[str]:
    md = ["## Evaluations", ""]
    md += _table(["Model", "Run", "Native run", "Sample", "DunDi setting", "Clean acc. native",
                  "Clean acc. DunDi"],
                 [[ev.name, f"`{repo_relative(ev.model.get('path'))}`", f"`{repo_relative(ev.native.get('path'))}`",
                   ev.scope(),
                   ev.two_step(), pct(ev.clean["native"]), pct(ev.clean["dundi"])] for ev in evals])
    return md + [""]


def _table1(evals: list[Evaluation], datasets: list[str]) -> list[str]:
    n_all = sorted({n for ev in evals for n in ev.clean["dundi_at_n"]})
    md = ["## Table 1 — accuracy vs number of oracle images n", ""]
    for ds in datasets:
        group = [ev for ev in evals if ev.dataset == ds]
        body, natives = [], {}
        for ev in group:
            if ev.native.get("path") and ev.native["path"] not in natives:
                natives[ev.native["path"]] = [ev.native.get("name", "Native"), pct(ev.clean["native"])] + \
                                             ["N/A"] * (len(n_all) - 1)
        body += list(natives.values())
        for ev in group:
            body.append([ev.name] + [pct(ev.clean["dundi_at_n"].get(n)) for n in n_all])
        md += [f"Clean accuracy on {group[0].scope()}; two-step with m = min({group[0].clean.get('m')}, n) "
               f"coarse oracles per class, k = {group[0].clean.get('k')}. No attack, no threat model: "
               f"clean inputs.", ""]
        md += _table(["Model"] + [f"n = {n}" for n in n_all], body) + [""]
    return md


def _fig6(transfer: list[Evaluation], settings: list, norms: dict, out: Path, figures: dict) -> list[str]:
    md = ["## Fig. 6 — defense success rate per attack and model (threat model: transfer)", ""]
    md += [f"Threat model: {THREAT_TEXT['transfer']}. Sample: {transfer[0].scope()}.", ""]
    header = ["Model", "Clean acc. DunDi", "Clean acc. native"] + \
             [f"{a} ({norms[(a, e)]}, {budget(norms[(a, e)], e)})" for a, e in settings] + ["Average"]
    body, body_fooled = [], []
    for ev in transfer:
        by = {(r["attack"], r["eps"]): r for r in _paper_rows(ev)}
        vals = [by[s]["defense_success"] if s in by else None for s in settings]
        present = [v for v in vals if v is not None]
        body.append([ev.name, pct(ev.clean["dundi"]), pct(ev.clean["native"])] + [pct(v) for v in vals]
                    + [pct(sum(present) / len(present)) if present else "—"])
        body_fooled.append([ev.name, pct(ev.clean["dundi"]), pct(ev.clean["native"])] +
                           [f"{pct(by[s]['defense_success_fooled'])} of {by[s]['native_fooled']}"
                            if s in by else "—" for s in settings] + ["—"])
    md += _table(header, body) + [""]
    md += ["Same, counted only over adversarial samples that fooled the native model "
           "(native correct clean, wrong adversarially) — the samples an attack on the native "
           "model actually produced:", ""]
    md += _table(header, body_fooled) + [""]
    md += ["Attack settings:", *_settings_lines([r for ev in transfer for r in _paper_rows(ev)]), ""]
    name = plot_defense_bars(transfer, settings, out / "fig6_defense_success.png", norms)
    figures["plots"].append(name)
    figures["fig6"] = {ev.name: {f"{r['attack']}@{eps_text(r['eps'])}": r["defense_success"]
                                 for r in _paper_rows(ev)} for ev in transfer}
    return md + [f"![Fig. 6]({name})", ""]


def _table2(transfer: list[Evaluation], settings: list, norms: dict) -> list[str]:
    md = ["## Table 2 — accuracy and defense success vs number of training tuples", ""]
    by_model: dict[str, list[Evaluation]] = {}
    for ev in transfer:
        key = f"DunDi_{ev.model.get('mode')} {ev.model.get('arch')} on {ev.dataset}"
        by_model.setdefault(key, []).append(ev)
    for key, group in by_model.items():
        group = sorted(group, key=lambda e: e.model.get("tuples") or 0)
        md += [f"{key}; sample: {group[0].scope()}; threat model: transfer; defense success = "
               f"mean over the attacks {', '.join(f'{a} ({budget(norms[(a, e)], e)})' for a, e in settings)}; "
               f"{group[0].two_step()}.", ""]
        acc, ds_row = ["Clean accuracy"], ["Defense success rate"]
        for ev in group:
            vals = [r["defense_success"] for r in _paper_rows(ev)]
            acc.append(pct(ev.clean["dundi"]))
            ds_row.append(pct(sum(vals) / len(vals)) if vals else "—")
        md += _table(["Tuples"] + [f"{ev.model.get('tuples'):,}" if ev.model.get("tuples") else "?"
                                    for ev in group], [acc, ds_row]) + [""]
        if len(group) == 1:
            md += ["(One tuple count evaluated; the paper varies 18,000 … 360,000. Pass one "
                   "evaluation directory per trained tuple count to fill this table.)", ""]
    return md


def _fig7(transfer: list[Evaluation], norms: dict, out: Path, figures: dict) -> list[str]:
    md = ["## Fig. 7 — defense success rate vs number of oracle images n (threat model: transfer)", ""]
    md += [f"Adversarial samples are the transfer ones above; DunDi classifies them with n oracles "
           f"per class and min(m, n) coarse oracles per class in step 1. Sample: {transfer[0].scope()}.", ""]
    for ev in transfer:
        keep = {(r["attack"], r["eps"]) for r in _paper_rows(ev)}
        curves = {key: c for key, c in ev.defense_at_n("transfer").items() if key in keep}
        ns = sorted({n for c in curves.values() for n in c})
        md += [f"{ev.name} (clean accuracy {pct(ev.clean['dundi'])}):", ""]
        md += _table(["Attack"] + [f"n = {n}" for n in ns],
                     [[f"{a} ({budget(norms.get((a, e), ''), e)})"] + [pct(c.get(n)) for n in ns]
                      for (a, e), c in curves.items()]) + [""]
    name = plot_defense_vs_n(transfer, out / "fig7_defense_vs_n.png", norms)
    figures["plots"].append(name)
    return md + [f"![Fig. 7]({name})", ""]


def _paper_sections(evals: list[Evaluation], out: Path, figures: dict) -> list[str]:
    """Fig. 6, Table 2 and Fig. 7: the paper's transfer figures, when there are transfer rows."""
    transfer = [ev for ev in evals if ev.rows("transfer")]
    if not transfer:
        return []
    settings = sorted({(r["attack"], r["eps"]) for ev in transfer for r in _paper_rows(ev)})
    norms = {(r["attack"], r["eps"]): r["norm"] for ev in transfer for r in _paper_rows(ev)}
    return (_fig6(transfer, settings, norms, out, figures) + _table2(transfer, settings, norms)
            + _fig7(transfer, norms, out, figures))


NATIVE_ROBUST_NOTE = ("Native robust acc. = the native model's accuracy on the same adversarial inputs, "
                      "correct clean and adversarially. Under transfer they were crafted on the native "
                      "model (a white-box attack on it); under adaptive, adaptive-all and feature they "
                      "were crafted on DunDi, so the native column shows how those inputs transfer to "
                      "the native model, not how robust it is.")


def _attack_table(ev: Evaluation) -> list[str]:
    header = ["Threat model", "Attack", "Norm", "Budget (eps; L0: gamma)", "Steps", "Clean acc.", "Defense success",
              "Robust acc.", "Attack success on target", "Native robust acc.", "Mean Linf / L2 / L0 (flipped samples)",
              "Stand-in ≠ rule (adv.)"]
    body = [[r["threat"], r["attack"], r["norm"], budget(r["norm"], r["eps"]), str(r["steps"]),
             pct(r["clean_accuracy_dundi"]), pct(r["defense_success"]), pct(r["robust_accuracy"]),
             pct(r["attack_success_rate"]), pct(r["native_robust_accuracy"]),
             f"{r['mean_linf']:.3g} / {r['mean_l2']:.3g} / {r['mean_l0']:.0f}"
             if not math.isnan(r["mean_linf"]) else "—",
             pct(r.get("rule_disagreement"))] for r in ev.attacks]
    return _table(header, body) + ["", NATIVE_ROBUST_NOTE, ""]


def _worst_and_certified(ev: Evaluation) -> list[str]:
    md = ["Worst case over attacks, per sample (clean accuracy "
          f"{pct(ev.clean['dundi'])}):", ""]
    md += _table(["Threat model", "Norm", "Budget", "Attacks", "Samples", "Robust acc. DunDi", "Robust acc. native"],
                 [[w["threat"], w["norm"], "all" if w["norm"] == "any" else budget(w["norm"], w["eps"]),
                   ", ".join(w["settings"]), str(w["count"]), pct(w["robust_accuracy"]),
                   pct(w["native_robust_accuracy"])] for w in ev.worst]) + [""]
    if ev.certified:
        md += ["Certified accuracy (the two-step rule provably keeps the true label in the whole "
               "L∞ ball; interval bounds, docs/certification.md) beside the worst case over every "
               "L∞ attack at or below that eps, same samples; no attack flipped a certified sample:", ""]
        md += _table(["Eps (Linf)", "Samples", "Clean acc.", "Robust acc. (worst case)", "Certified acc."],
                     [[eps_text(c["eps"]), str(c["count"]), pct(c["clean_accuracy"]),
                       pct(c["robust_accuracy"]), pct(c["certified_accuracy"])] for c in ev.certified]) + [""]
    return md


def _robustness(evals: list[Evaluation], out: Path, figures: dict) -> list[str]:
    md = ["## Robust accuracy per threat model", ""]
    for ev in evals:
        md += [f"### {ev.name}", "",
               f"Sample: {ev.scope()}; {ev.two_step()}; clean accuracy DunDi {pct(ev.clean['dundi'])}, "
               f"native {pct(ev.clean['native'])}.", ""]
        md += _attack_table(ev) + _worst_and_certified(ev)
        md += ["Attack settings:", *_settings_lines(ev.attacks), ""]
        name = plot_robust_vs_eps(ev, out / f"robust_vs_eps_{slug(ev.name)}.png")
        md += [f"![robust accuracy vs eps, {ev.name}]({name})", ""]
        figures["plots"].append(name)
        if ev.warnings:
            md += ["Checks (auto-attack style) — **warnings**:", *[f"- {w}" for w in ev.warnings], ""]
        else:
            md += ["Checks (auto-attack style): no zero gradients beyond 5% of samples; no black-box "
                   "attack beat the white-box ones (where both were run).", ""]
    return md


def _load(results: Iterable[str | os.PathLike]) -> list[Evaluation]:
    evals = [Evaluation(p) for p in results]
    if not evals:
        from dundi.errors import DundiError

        raise DundiError("dundi report needs at least one evaluation directory")
    names = [ev.name for ev in evals]
    for ev in evals:  # the same model name twice (e.g. several tuple counts)
        if names.count(ev.name) > 1:
            ev.name = f"{ev.name} ({ev.model.get('tuples')} tuples, {ev.path.name})"
    return evals


def write_report(results: Iterable[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Write ``report.md``, its PNG plots and ``report.json`` into ``out``; return figures.
    The report opens with the summary (worst case per threat model, certified accuracy) so the
    decisive number is on the first screen; the paper's figures follow."""
    evals = _load(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = sorted({ev.dataset for ev in evals})
    figures: dict[str, Any] = {"report": str(out / REPORT_FILE), "plots": []}
    summary_md, figures["summary"] = _summary(evals)
    md = _intro(datasets) + summary_md + _definitions(evals) + _evaluations_table(evals)
    md += _table1(evals, datasets)
    figures["table1"] = {ev.name: ev.clean["dundi_at_n"] for ev in evals}
    md += _paper_sections(evals, out, figures) + _robustness(evals, out, figures)
    atomic_write_text(out / REPORT_FILE, "\n".join(md) + "\n")
    figures["evaluations"] = [{"path": str(ev.path), "model": ev.name, "dataset": ev.dataset,
                               "clean_accuracy": ev.clean, "attacks": ev.attacks, "worst_case": ev.worst,
                               "warnings": ev.warnings, "certified": ev.certified} for ev in evals]
    # the published copy names the report and the evaluations relative to the repository
    published = {**figures, "report": repo_relative(figures["report"]),
                 "evaluations": [{**e, "path": repo_relative(e["path"])} for e in figures["evaluations"]]}
    atomic_write_json(out / "report.json", json_safe(published))
    return figures


__all__ = ["write_report", "Evaluation"]
