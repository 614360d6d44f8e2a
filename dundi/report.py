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
robustness is claimed. Plots use matplotlib's object API with the Agg canvas (no display).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dundi.artifacts import atomic_write_json, atomic_write_text
from dundi.results import (attack_summary, checks, clean_accuracy, json_safe, read_evaluation,
                           read_results, worst_case)

REPORT_FILE = "report.md"
THREAT_TEXT = {
    "transfer": "transfer — crafted on the native model's logits, then classified by DunDi (the paper's protocol)",
    "adaptive": "adaptive — white-box on DunDi's two-step rule as deployed (a differentiable stand-in whose argmax is Algorithm 1 at the evaluation's n, m, k; success judged by the rule itself)",
    "adaptive-all": "adaptive-all — white-box on DunDi's per-class score over all classes (mean distance to the n oracles of each class; the rule only when k = C)",
    "feature": "feature — white-box on DunDi's embedding, pulling f(x) towards the nearest oracles of another class",
}


def pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _eps(e: float) -> str:
    return "unbounded" if math.isinf(e) else f"{e:g}"


def budget(norm: str, e: float) -> str:
    """The budget in words: eps for Linf / L2, gamma (largest fraction of pixels) for L0."""
    if norm == "L0":
        return f"gamma {e:g}"
    return f"eps {_eps(e)}"


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
        from dundi.certified_eval import certified_summary

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


# ---- plots ---------------------------------------------------------------------------------

def _save(fig, path: Path) -> str:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path.name


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def plot_defense_bars(evals: list[Evaluation], settings: list[tuple[str, float]], path: Path,
                      norms: dict | None = None) -> str:
    norms = norms or {}
    fig, (ax,) = _figure(width=max(6.0, 1.6 * len(settings) + 2))
    width = 0.8 / max(1, len(evals))
    x = np.arange(len(settings))
    for i, ev in enumerate(evals):
        by = {(r["attack"], r["eps"]): r["defense_success"] for r in ev.rows("transfer")}
        vals = [100 * by.get(s, float("nan")) for s in settings]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=ev.name)
    ax.set_xticks(x, [f"{a}\n{budget(norms.get((a, e), ''), e)}" for a, e in settings])
    ax.set_ylabel("defense success rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Defense success per attack (transfer, {evals[0].dataset})")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_defense_vs_n(evals: list[Evaluation], path: Path, norms: dict | None = None) -> str:
    norms = norms or {}
    fig, axes = _figure(ncols=len(evals), width=5.0)
    for ax, ev in zip(axes, evals):
        for (a, e), curve in ev.defense_at_n("transfer").items():
            if (a, e) not in norms:  # not one of the paper's attacks (see _paper_rows)
                continue
            ns = sorted(curve)
            ax.plot(ns, [100 * curve[n] for n in ns], marker="o", label=f"{a} {budget(norms.get((a, e), ''), e)}")
        ax.set_xlabel("oracle images per class (n)")
        ax.set_ylabel("defense success rate (%)")
        ax.set_title(f"{ev.name} (transfer)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_robust_vs_eps(ev: Evaluation, path: Path) -> str:
    threats = sorted({r["threat"] for r in ev.attacks})
    fig, axes = _figure(ncols=max(1, len(threats)), width=5.0)
    for ax, threat in zip(axes, threats):
        rows = ev.rows(threat)
        for attack in sorted({r["attack"] for r in rows}):
            pts = sorted((r["eps"], r["robust_accuracy"]) for r in rows  # Linf axis: L0's γ is no eps
                         if r["attack"] == attack and r["norm"] == "Linf" and not math.isinf(r["eps"]))
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=attack)
        worst = sorted((w["eps"], w["robust_accuracy"]) for w in ev.worst
                       if w["threat"] == threat and w["norm"] == "Linf")
        if worst:
            ax.plot([w[0] for w in worst], [100 * w[1] for w in worst], "k--", marker="x",
                    label="worst case (Linf attacks)")
        if ev.certified:  # a lower bound on every curve of the panel: the proof, not an attack
            ax.plot([c["eps"] for c in ev.certified], [100 * c["certified_accuracy"] for c in ev.certified],
                    color="green", marker="s", label="certified (interval bounds)")
        ax.axhline(100 * ev.clean["dundi"], color="grey", linestyle=":", label="clean accuracy")
        ax.set_xlabel("eps")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{ev.name}: {threat}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{ev.scope()}; clean accuracy {pct(ev.clean['dundi'])}; steps per attack in report.md",
                 fontsize=9, y=1.02)
    return _save(fig, path)


# ---- the report ----------------------------------------------------------------------------

def _paper_rows(ev: "Evaluation") -> list[dict]:
    """The transfer rows the paper's figures use: its four attacks at their settings when the
    evaluation has them (other transfer attacks, e.g. PGD curves, go to the per-threat section),
    else every transfer row."""
    from dundi.evaluate import PAPER_ATTACKS
    from dundi.results import attack_base

    rows = ev.rows("transfer")
    return [r for r in rows if attack_base(r["attack"]) in PAPER_ATTACKS] or rows


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower()


def write_report(results: Iterable[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Write ``report.md``, its PNG plots and ``report.json`` into ``out``; return figures."""
    evals = [Evaluation(p) for p in results]
    if not evals:
        from dundi.errors import DundiError

        raise DundiError("dundi report needs at least one evaluation directory")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [ev.name for ev in evals]
    for i, ev in enumerate(evals):  # the same model name twice (e.g. several tuple counts)
        if names.count(ev.name) > 1:
            ev.name = f"{ev.name} ({ev.model.get('tuples')} tuples, {ev.path.name})"
    datasets = sorted({ev.dataset for ev in evals})
    md: list[str] = ["# DunDi adversarial evaluation", ""]
    md += [f"Dataset(s): {', '.join(datasets)}. Every number below names its dataset, the evaluated "
           f"sample, the clean accuracy, the attack (norm, eps, steps) and the threat model.", "",
           "Threat models:", *[f"- {THREAT_TEXT[t]}" for t in
                               sorted({r['threat'] for ev in evals for r in ev.attacks}) if t in THREAT_TEXT], "",
           "Defense success rate = correctly classified adversarial samples / all adversarial "
           "samples (one per evaluated test image), as in the paper (§4.3). Robust accuracy = "
           "correct on the clean and on the adversarial input; worst case = correct clean and "
           "under every attack of the group, per sample.", ""]
    md += ["## Evaluations", ""]
    md += _table(["Model", "Run", "Native run", "Sample", "DunDi setting", "Clean acc. native",
                  "Clean acc. DunDi"],
                 [[ev.name, f"`{ev.model.get('path')}`", f"`{ev.native.get('path')}`", ev.scope(),
                   ev.two_step(), pct(ev.clean["native"]), pct(ev.clean["dundi"])] for ev in evals])
    md.append("")
    figures: dict[str, Any] = {"report": str(out / REPORT_FILE), "plots": []}

    # Table 1 -----------------------------------------------------------------------------
    n_all = sorted({n for ev in evals for n in ev.clean["dundi_at_n"]})
    md += ["## Table 1 — accuracy vs number of oracle images n", ""]
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
        md += [f"Clean accuracy on {group[0].scope()}; two-step with m = min({group[0].clean.get('m')}, n), "
               f"k = {group[0].clean.get('k')}. No attack, no threat model: clean inputs.", ""]
        md += _table(["Model"] + [f"n = {n}" for n in n_all], body) + [""]
    figures["table1"] = {ev.name: ev.clean["dundi_at_n"] for ev in evals}

    # Fig. 6 ------------------------------------------------------------------------------------
    transfer = [ev for ev in evals if ev.rows("transfer")]
    if transfer:
        settings = sorted({(r["attack"], r["eps"]) for ev in transfer for r in _paper_rows(ev)})
        norms = {(r["attack"], r["eps"]): r["norm"] for ev in transfer for r in _paper_rows(ev)}
        md += ["## Fig. 6 — defense success rate per attack and model (threat model: transfer)", ""]
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
        md += [f"![Fig. 6]({name})", ""]
        figures["plots"].append(name)
        figures["fig6"] = {ev.name: {f"{r['attack']}@{_eps(r['eps'])}": r["defense_success"]
                                     for r in _paper_rows(ev)} for ev in transfer}

        # Table 2 ---------------------------------------------------------------------------------
        md += ["## Table 2 — accuracy and defense success vs number of training tuples", ""]
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

        # Fig. 7 ------------------------------------------------------------------------------------
        md += ["## Fig. 7 — defense success rate vs number of oracle images n (threat model: transfer)", ""]
        md += [f"Adversarial samples are the transfer ones above; DunDi classifies them with n oracles "
               f"per class, m = min(m, n). Sample: {transfer[0].scope()}.", ""]
        for ev in transfer:
            keep = {(r["attack"], r["eps"]) for r in _paper_rows(ev)}
            curves = {key: c for key, c in ev.defense_at_n("transfer").items() if key in keep}
            ns = sorted({n for c in curves.values() for n in c})
            md += [f"{ev.name} (clean accuracy {pct(ev.clean['dundi'])}):", ""]
            md += _table(["Attack"] + [f"n = {n}" for n in ns],
                         [[f"{a} ({budget(norms.get((a, e), ''), e)})"] + [pct(c.get(n)) for n in ns]
                          for (a, e), c in curves.items()]) + [""]
        name = plot_defense_vs_n(transfer, out / "fig7_defense_vs_n.png", norms)
        md += [f"![Fig. 7]({name})", ""]
        figures["plots"].append(name)

    # Robustness per threat model ---------------------------------------------------------------
    md += ["## Robust accuracy per threat model", ""]
    for ev in evals:
        md += [f"### {ev.name}", "",
               f"Sample: {ev.scope()}; {ev.two_step()}; clean accuracy DunDi {pct(ev.clean['dundi'])}, "
               f"native {pct(ev.clean['native'])}.", ""]
        header = ["Threat model", "Attack", "Norm", "Budget (eps; L0: gamma)", "Steps", "Clean acc.", "Defense success",
                  "Robust acc.", "Attack success on target", "Native robust acc.", "Mean Linf / L2 / L0 (flipped samples)",
                  "Stand-in ≠ rule (adv.)"]
        body = [[r["threat"], r["attack"], r["norm"], budget(r["norm"], r["eps"]), str(r["steps"]),
                 pct(r["clean_accuracy_dundi"]), pct(r["defense_success"]), pct(r["robust_accuracy"]),
                 pct(r["attack_success_rate"]), pct(r["native_robust_accuracy"]),
                 f"{r['mean_linf']:.3g} / {r['mean_l2']:.3g} / {r['mean_l0']:.0f}"
                 if not math.isnan(r["mean_linf"]) else "—",
                 pct(r.get("rule_disagreement"))] for r in ev.attacks]
        md += _table(header, body) + [""]
        md += ["Worst case over attacks, per sample (clean accuracy "
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
                         [[_eps(c["eps"]), str(c["count"]), pct(c["clean_accuracy"]),
                           pct(c["robust_accuracy"]), pct(c["certified_accuracy"])] for c in ev.certified]) + [""]
        md += ["Attack settings:", *_settings_lines(ev.attacks), ""]
        name = plot_robust_vs_eps(ev, out / f"robust_vs_eps_{_slug(ev.name)}.png")
        md += [f"![robust accuracy vs eps, {ev.name}]({name})", ""]
        figures["plots"].append(name)
        if ev.warnings:
            md += ["Checks (auto-attack style) — **warnings**:", *[f"- {w}" for w in ev.warnings], ""]
        else:
            md += ["Checks (auto-attack style): no zero gradients beyond 5% of samples; no black-box "
                   "attack beat the white-box ones (where both were run).", ""]
    atomic_write_text(out / REPORT_FILE, "\n".join(md) + "\n")
    figures["evaluations"] = [{"path": str(ev.path), "model": ev.name, "dataset": ev.dataset,
                               "clean_accuracy": ev.clean, "attacks": ev.attacks, "worst_case": ev.worst,
                               "warnings": ev.warnings, "certified": ev.certified} for ev in evals]
    atomic_write_json(out / "report.json", json_safe(figures))
    return figures


def demo_report(native_dir: str | os.PathLike, dundi_dirs: dict[str, str | os.PathLike] | list,
                out: str | os.PathLike, data_dir: str | None = None, quick: bool = False,
                progress: bool = True, log=print, limit: int | None = None,
                steps: int | None = None) -> dict[str, Any]:
    """The end of `dundi demo`: evaluate every DunDi run of the demo in this process (no Ray)
    under the paper's transfer protocol (FGSM, iFGSM-a, iFGSM-b, JSMA at their paper settings)
    and the adaptive threat model (FGSM and PGD, white-box on DunDi's score), then write the
    report to ``out/report``.

    ``dundi_dirs``: {display name: run dir} or a list of run dirs. Each run's evaluation goes
    to ``out/eval-<name>``; a rerun continues from its finished shards. ``quick`` evaluates 64
    test samples, else 200 (``limit`` overrides; ≈1 min per run and 64 samples on 2 cores); ``steps`` overrides the attacks' iterations
    (default: the paper's 50)."""
    from dundi.evaluate import PAPER_ATTACKS, EvalConfig, evaluate_local

    out = Path(out)
    runs = dundi_dirs.items() if isinstance(dundi_dirs, dict) else [(Path(p).name, p) for p in dundi_dirs]
    limit = limit or (64 if quick else 200)
    results = []
    for name, run_dir in runs:
        target = out / f"eval-{_slug(name)}"
        for threat, attacks in (("transfer", list(PAPER_ATTACKS)), ("adaptive", ["fgsm", "pgd"])):
            log(f"  evaluating {name}: {threat} threat model, {', '.join(attacks)}, {limit} test samples")
            cfg = EvalConfig(run=str(run_dir), native=str(native_dir), attacks=attacks, threats=[threat],
                             limit=limit, steps=steps, data_dir=data_dir, shard_size=64)
            evaluate_local(cfg, target, progress=progress, log=log)
        results.append(target)
    report = write_report(results, out / "report")
    return {"report": report["report"], "plots": [str(out / "report" / p) for p in report["plots"]],
            "evaluations": [str(p) for p in results]}


__all__ = ["write_report", "demo_report", "Evaluation"]
