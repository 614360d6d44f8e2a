"""The abstain benchmark's table (markdown, stdout) and risk-coverage plot from its raw rows.

    python docs/results/abstain/render.py docs/results/abstain/bench.jsonl \
        docs/results/abstain/risk_coverage.png > docs/results/abstain/bench.md

The rows are what bench/abstain.py wrote (--out); nothing here is typed in by hand.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pct(v) -> str:
    return "-" if v is None or v != v else f"{v:.1%}"


def main(path: str, plot: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        by = {(r["rule"], r["set"]): r for r in mine}
        print(f"### {run}\n")
        print("| set | group | without abstaining: accuracy | " +
              " | ".join(f"{rule}: withheld / accuracy answering" for rule in rules) + " |")
        print("|---|---|---|" + "---|" * len(rules))
        for s in dict.fromkeys(r["set"] for r in mine if r["group"] != "aurc"):
            first = by[(rules[0], s)]
            cells = [f"{pct(by[(rule, s)]['withheld'])} / {pct(by[(rule, s)].get('accuracy_answering'))}"
                     for rule in rules]
            print(f"| {s} | {first['group']} | {pct(first.get('accuracy_all'))} | " + " | ".join(cells) + " |")
        print("\n| rule | AURC, all 15 corruptions | design subset | held-out subset | held-out clean withheld |")
        print("|---|---|---|---|---|")
        for rule in rules:
            a = by[(rule, "all corruptions")]
            print(f"| {rule} | {a['aurc']:.4f} | {a['aurc_design']:.4f} | {a['aurc_held_out']:.4f} | "
                  f"{pct(a['calibration_withheld'])} |")
        print(f"\n{a['count']} corrupted images, accuracy without abstaining {pct(a['accuracy_all'])}; "
              f"calibration: {a['calibration']}.\n")
    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for rule in rules:
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
