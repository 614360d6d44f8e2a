"""The abstain benchmark's tables (markdown, stdout) and risk-coverage plot from its raw rows.

    python docs/results/abstain/render.py docs/results/abstain/bench.jsonl \
        docs/results/abstain/risk_coverage.png > docs/results/abstain/bench.md

The rows are what bench/abstain.py wrote (--out), one or more runs; nothing here is typed in by
hand: the verdicts on the issue's targets are computed from the same rows.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MAIN = ("today's rule (4 signals)", "nearest-oracle distance alone", "selective rule, no shape signal",
        "selective rule")
SERVED = "selective rule"
PROBES = ("fog", "fashion-mnist", "gaussian noise 0.1", "contrast 70%", "clean test")


def pct(v) -> str:
    return "-" if v is None or v != v else f"{v:.1%}"


def targets(by: dict, sets: list[str]) -> list[str]:
    """The issue's targets for the served rule, each met or missed, from the rows."""
    rows = [by[(SERVED, s)] for s in sets]
    corr = [r for r in rows if r["group"].startswith("corruption") or r["group"] == "scan variation"]
    keep = [r for r in corr if r["accuracy_all"] >= 0.9]
    low = [r for r in keep if r["withheld"] > 0.10]
    worse = [r for r in corr if r["accuracy_answering"] == r["accuracy_answering"]
             and r["accuracy_answering"] < r["accuracy_all"]]
    half = [r for r in corr if r["withheld"] > 0.5 and r["accuracy_answering"] < 0.95]   # NaN: none answered
    vacuous = [r["set"] for r in corr if r["withheld"] == 1.0]
    far = [r for r in rows if r["group"] == "far-OOD"]
    far_miss = [r for r in far if r["withheld"] < 0.95]
    a = {rule: by[(rule, "all corruptions")]["aurc"] for rule in MAIN[:2] + (SERVED,)}

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    def compared(rs) -> str:
        return ", ".join(f"{r['set']} ({r['accuracy_answering']:.2%} < {r['accuracy_all']:.2%})" for r in rs) or "none"

    def named(rs, key) -> str:
        return ", ".join(f"{r['set']} ({pct(r[key])})" for r in rs) or "none"

    return [f"- at most 10 % withheld where the rule keeps >= 90 % accuracy ({len(keep)} sets): "
            f"{verdict(not low)}; above 10 %: {named(low, 'withheld')}",
            f"- accuracy when answering >= without abstaining, every corruption: {verdict(not worse)}; "
            f"below: {compared(worse)}",
            f"- >= 95 % accurate when answering where more than half is withheld: {verdict(not half)}; "
            f"missed on: {named(half, 'accuracy_answering')} (nothing answered, met vacuously: "
            f"{', '.join(vacuous) or 'none'})",
            f"- far-OOD >= 95 % withheld ({len(far)} sets): {verdict(not far_miss)}; below: "
            f"{named(far_miss, 'withheld')}",
            f"- AURC on all 15 corruptions below today's rule and the distance alone: "
            f"{verdict(a[SERVED] < min(a[MAIN[0]], a[MAIN[1]]))} ({a[SERVED]:.4f} against "
            f"{a[MAIN[0]]:.4f} and {a[MAIN[1]]:.4f})"]


def run_tables(mine: list[dict]) -> None:
    by = {(r["rule"], r["set"]): r for r in mine}
    rules = list(dict.fromkeys(r["rule"] for r in mine))
    sets = list(dict.fromkeys(r["set"] for r in mine if r["group"] != "aurc"))
    print("| set | group | without abstaining: accuracy | " +
          " | ".join(f"{rule}: withheld / accuracy answering" for rule in MAIN) + " |")
    print("|---|---|---|" + "---|" * len(MAIN))
    for s in sets:
        first = by[(MAIN[0], s)]
        cells = [f"{pct(by[(rule, s)]['withheld'])} / {pct(by[(rule, s)].get('accuracy_answering'))}"
                 for rule in MAIN]
        print(f"| {s} | {first['group']} | {pct(first.get('accuracy_all'))} | " + " | ".join(cells) + " |")
    print(f"\nTargets, {SERVED} (served by default):\n")
    print("\n".join(targets(by, sets)))
    print("\n| rule | AURC, all 15 corruptions | design subset | held-out subset | held-out clean withheld | "
          + " | ".join(f"{p} withheld" for p in PROBES) + " |")
    print("|---|---|---|---|---|" + "---|" * len(PROBES))
    for rule in rules:
        a = by[(rule, "all corruptions")]
        probes = [pct(by[(rule, p)]["withheld"]) if (rule, p) in by else "-" for p in PROBES]
        print(f"| {rule} | {a['aurc']:.4f} | {a['aurc_design']:.4f} | {a['aurc_held_out']:.4f} | "
              f"{pct(a['calibration_withheld'])} | " + " | ".join(probes) + " |")
    print(f"\n{a['count']} corrupted images, accuracy without abstaining {pct(a['accuracy_all'])}; "
          f"calibration: {a['calibration']}.\n")


def main(path: str, plot: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for run in runs:
        print(f"### {run}\n")
        run_tables([r for r in rows if r["run"] == run])
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for rule in MAIN:
            a = next(r for r in rows if r["run"] == run and r["rule"] == rule and r["group"] == "aurc")
            ax.plot(a["coverage"], a["risk"], label=f"{rule} (AURC {a['aurc']:.3f})")
        ax.set_xlabel("coverage (share answered)")
        ax.set_ylabel("risk (error rate among answered)")
        ax.set_title(f"{run}: 15 MNIST-C corruptions")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
