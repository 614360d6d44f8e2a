"""The report's formatting and plots: percentages and budgets as the tables print them, and
the PNG plots (matplotlib's object API with the Agg canvas, no display) of
:mod:`dundi.evaluation.report`, each drawn from its ``Evaluation`` objects."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

Evaluation = Any  # dundi.evaluation.report.Evaluation: not imported, report imports this module


def pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def eps_text(e: float) -> str:
    return "unbounded" if math.isinf(e) else f"{e:g}"


def budget(norm: str, e: float) -> str:
    """The budget in words: eps for Linf / L2, gamma (largest fraction of pixels) for L0."""
    if norm == "L0":
        return f"gamma {e:g}"
    return f"eps {eps_text(e)}"


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


def _wrap(text: str, width: int = 38) -> str:
    """Long model and attack names on several lines instead of clipped or overlapping."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False)) or text


def _percent_axis(ax) -> None:
    """0-100 % with room below 0 and above 100, so 0 % markers and zero-height bars sit visibly
    off the axis line and 100 % markers are not cut in half."""
    ax.set_ylim(-5, 108)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)


def _legend(ax, entries: int) -> None:
    """Below the axes (never over the data); the saved figure's tight box keeps it whole."""
    if entries:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1 if entries > 3 else entries,
                  frameon=False)


def _eps_axis(ax, eps_values: list[float]) -> None:
    """An axis from 0 to a little beyond the largest eps, ticked at the evaluated values: one
    evaluated eps is a point at a readable position, not a dot on a 0.285-0.315 axis."""
    eps_values = sorted(set(eps_values))
    if not eps_values:
        return
    ax.set_xlim(0, max(eps_values) * 1.15)
    ax.set_xticks([0.0] + eps_values, ["0"] + [f"{e:g}" for e in eps_values])
    ax.set_xlabel("eps (L-inf, pixels in [0, 1]); eps 0 = clean accuracy")


def plot_defense_bars(evals: list[Evaluation], settings: list[tuple[str, float]], path: Path,
                      norms: dict | None = None) -> str:
    norms = norms or {}
    fig, (ax,) = _figure(width=max(6.0, 1.6 * len(settings) * max(1, len(evals)) ** 0.5 + 2))
    width = 0.8 / max(1, len(evals))
    x = np.arange(len(settings))
    for i, ev in enumerate(evals):
        by = {(r["attack"], r["eps"]): r["defense_success"] for r in ev.rows("transfer")}
        vals = [100 * by.get(s, float("nan")) for s in settings]
        bars = ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=_wrap(ev.name),
                      edgecolor="black", linewidth=0.8)
        ax.bar_label(bars, labels=["—" if math.isnan(v) else f"{v:.1f}%" for v in vals], fontsize=7, padding=2)
    ax.set_xticks(x, [f"{_wrap(a, 16)}\n{budget(norms.get((a, e), ''), e)}" for a, e in settings])
    ax.set_ylabel("defense success rate (%)")
    _percent_axis(ax)
    ax.set_title(_wrap(f"Defense success per attack — {evals[0].dataset}, threat model transfer, "
                       f"{evals[0].clean['count']:,}\u00a0samples", 70))
    _legend(ax, len(evals))
    return _save(fig, path)


def plot_defense_vs_n(evals: list[Evaluation], path: Path, norms: dict | None = None) -> str:
    norms = norms or {}
    fig, axes = _figure(ncols=len(evals), width=5.0)
    for ax, ev in zip(axes, evals):
        shown = 0
        for (a, e), curve in ev.defense_at_n("transfer").items():
            if (a, e) not in norms:  # not one of the paper's attacks (see _paper_rows)
                continue
            ns = sorted(curve)
            ax.plot(ns, [100 * curve[n] for n in ns], marker="o", clip_on=False,
                    label=_wrap(f"{a} {budget(norms.get((a, e), ''), e)}"))
            shown += 1
        ax.set_xlabel("oracle images per class (n)")
        ax.set_ylabel("defense success rate (%)")
        ax.set_title(_wrap(f"{ev.name} — {ev.dataset}, transfer, {ev.clean['count']:,}\u00a0samples", 45), fontsize=9)
        _percent_axis(ax)
        _legend(ax, shown)
    return _save(fig, path)


def _robust_panel(ax, ev: Evaluation, threat: str) -> None:
    rows = ev.rows(threat)
    clean = 100 * ev.clean["dundi"]
    curves = 0
    for attack in sorted({r["attack"] for r in rows}):
        pts = sorted((r["eps"], r["robust_accuracy"]) for r in rows  # Linf axis: L0's γ is no eps
                     if r["attack"] == attack and r["norm"] == "Linf" and not math.isinf(r["eps"]))
        if pts:
            ax.plot([0.0] + [p[0] for p in pts], [clean] + [100 * p[1] for p in pts], marker="o",
                    clip_on=False, label=_wrap(attack))
            curves += 1
    worst = sorted((w["eps"], w["robust_accuracy"]) for w in ev.worst
                   if w["threat"] == threat and w["norm"] == "Linf")
    if worst:
        ax.plot([0.0] + [w[0] for w in worst], [clean] + [100 * w[1] for w in worst], "k--", marker="x",
                markersize=9, clip_on=False, label="worst case (Linf attacks)")
        for e, acc in worst:
            ax.annotate(f"{100 * acc:.1f}%", (e, 100 * acc), textcoords="offset points", xytext=(4, 6), fontsize=8)
    eps_values = [r["eps"] for r in rows if r["norm"] == "Linf" and not math.isinf(r["eps"])]
    if ev.certified:  # a lower bound on every curve of the panel: the proof, not an attack
        from dundi.evaluation.certified_eval import certified_curve

        curve = certified_curve(ev.path, max(eps_values + [c["eps"] for c in ev.certified]))
        if curve:  # from the per-sample radii, as the field draws it
            ax.plot([0.0] + [e for e, _ in curve], [clean] + [100 * a for _, a in curve], color="green",
                    clip_on=False, label="certified (radius \u2265 eps)")
        ax.plot([c["eps"] for c in ev.certified], [100 * c["certified_accuracy"] for c in ev.certified],
                color="green", marker="s", linestyle="none", clip_on=False, label="certified at the attacked eps")
    ax.axhline(clean, color="grey", linestyle=":", label="clean accuracy")
    _eps_axis(ax, eps_values + [c["eps"] for c in ev.certified])
    ax.set_ylabel("robust accuracy (%)")
    _percent_axis(ax)
    ax.set_title(_wrap(f"{ev.name} — {ev.dataset}, threat model {threat}, {ev.clean['count']:,}\u00a0samples", 45),
                 fontsize=9)
    _legend(ax, curves + 2 + 2 * bool(ev.certified))


def plot_robust_vs_eps(ev: Evaluation, path: Path) -> str:
    threats = sorted({r["threat"] for r in ev.attacks})
    fig, axes = _figure(ncols=max(1, len(threats)), width=5.0)
    for ax, threat in zip(axes, threats):
        _robust_panel(ax, ev, threat)
    fig.suptitle(_wrap(f"{ev.scope()}; clean accuracy {pct(ev.clean['dundi'])}; steps per attack in report.md",
                       110), fontsize=9, y=1.08)
    return _save(fig, path)


