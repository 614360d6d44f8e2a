"""The report: Markdown tables and PNG plots from real (small) evaluations, and every
robustness table stating dataset, clean accuracy, attack, norm, eps, steps and threat model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from dundi.evaluation.table1 import demo_report
from dundi.evaluation.config import EvalConfig
from dundi.evaluation.evaluate import evaluate_local
from dundi.evaluation.report import write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def evaluation(mnist_runs, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-report")
    cfg = EvalConfig(run=str(mnist_runs["dundi"]), native=str(mnist_runs["native"]),
                     attacks=["fgsm", "ifgsm-a"], threats=["transfer", "adaptive"], eps=[0.1, 0.3],
                     steps=3, limit=24, shard_size=24, n_values=[1, 5, 10], data_dir=data_dir)
    evaluate_local(cfg, out, progress=False, log=lambda s: None)
    return out


def sections(markdown: str) -> dict[str, str]:
    parts = re.split(r"^## ", markdown, flags=re.M)
    return {p.splitlines()[0]: p for p in parts[1:]}


def test_report_files_and_required_fields(evaluation, tmp_path):
    # a second "model": the same rows under another tuple count, to fill Table 2's columns
    other = tmp_path / "eval-more-tuples"
    shutil.copytree(evaluation, other)
    meta = json.loads((other / "evaluation.json").read_text())
    meta["model"]["tuples"] = 2 * (meta["model"]["tuples"] or 1)
    (other / "evaluation.json").write_text(json.dumps(meta))

    out = tmp_path / "report"
    figures = write_report([evaluation, other], out)
    text = (out / "report.md").read_text()
    assert set(figures["plots"]) >= {"fig6_defense_success.png", "fig7_defense_vs_n.png"}
    for name in figures["plots"]:
        assert (out / name).read_bytes()[:8] == PNG and (out / name).stat().st_size > 5000
    assert json.loads((out / "report.json").read_text())["evaluations"][0]["dataset"] == "mnist-10k"

    parts = sections(text)
    titles = list(parts)
    for prefix in ("Table 1", "Fig. 6", "Table 2", "Fig. 7", "Robust accuracy per threat model"):
        assert any(t.startswith(prefix) for t in titles), prefix
    for title, body in parts.items():
        if "|" not in body:
            continue
        assert "mnist-10k" in body, title            # dataset
        assert "24 of" in body, title                # evaluated sample count
        assert re.search(r"[Cc]lean acc", body), title  # clean accuracy beside every table
        if title.startswith(("Fig.", "Table 2", "Robust")):
            for word in ("fgsm", "ifgsm-a", "eps", "transfer"):
                assert word in body, (title, word)
        if title.startswith(("Fig. 6", "Robust")):
            assert "Linf" in body and "steps 3" in body, title
        if title.startswith("Robust"):
            assert "adaptive" in body and "Worst case" in body and "Norm" in body and "Steps" in body
    assert "N/A" in parts[next(t for t in titles if t.startswith("Table 1"))]  # native: n = 1 only
    table2 = parts[next(t for t in titles if t.startswith("Table 2"))]
    assert table2.count("Defense success rate") == 1 and re.search(r"\| Tuples \| [\d,]+ \| [\d,]+ \|", table2)


def test_cli_report_json(evaluation, tmp_path, capsys):
    from dundi.cli.main import main

    assert main(["report", str(evaluation), "--out", str(tmp_path / "r"), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["report"].endswith("report.md") and figures["plots"]
    ev = figures["evaluations"][0]
    assert ev["clean_accuracy"]["count"] == 24
    assert {(a["threat"], a["attack"], a["eps"]) for a in ev["attacks"]} == {
        (t, a, e) for t in ("transfer", "adaptive") for a in ("fgsm", "ifgsm-a[steps=3]") for e in (0.1, 0.3)}


@pytest.mark.realdata
def test_demo_report_evaluates_and_reports(mnist_runs, data_dir, tmp_path):
    figures = demo_report(mnist_runs["native"], {"DunDi_R3": mnist_runs["dundi"]}, tmp_path, data_dir,
                          progress=False, log=lambda s: None, limit=8, steps=2)
    text = open(figures["report"]).read()
    for attack in ("fgsm", "ifgsm-a", "ifgsm-b", "jsma", "pgd"):
        assert attack in text
    assert "L0" in text and "adaptive" in text and "transfer" in text
    # a rerun finds every shard finished and only rewrites the report: every shard file keeps
    # its bytes and modification time (a recomputed shard would be rewritten atomically, new inode)
    shards = sorted(p for ev in figures["evaluations"] for p in Path(ev).rglob("*.parquet"))
    assert shards
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) for p in shards}
    report_before = Path(figures["report"]).stat().st_mtime_ns
    again = demo_report(mnist_runs["native"], {"DunDi_R3": mnist_runs["dundi"]}, tmp_path, data_dir,
                        progress=False, log=lambda s: None, limit=8, steps=2)
    after = sorted(p for ev in again["evaluations"] for p in Path(ev).rglob("*.parquet"))
    assert after == shards
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) for p in after} == before
    assert Path(again["report"]).stat().st_mtime_ns >= report_before


def _summary_table(markdown: str) -> list[dict[str, str]]:
    body = sections(markdown)["Summary"]
    lines = [ln for ln in body.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_summary_opens_the_report_with_worst_case_numbers_from_summarize(evaluation, tmp_path):
    """The first section is the summary, and each of its numbers is results.summarize()'s
    worst case for that threat model and budget, its clean accuracy and its sample count."""
    from dundi.evaluation.report import pct
    from dundi.evaluation.summary import summarize

    figures = write_report([evaluation], tmp_path / "r")
    text = (tmp_path / "r" / "report.md").read_text()
    assert list(sections(text))[0] == "Summary"
    assert text.index("## Summary") < text.index("## Fig. 6") < text.index("## Robust accuracy")
    truth = summarize(evaluation)
    worst = {(w["threat"], w["norm"], w["eps"]): w for w in truth["worst_case"] if w["norm"] != "any"}
    rows = _summary_table(text)
    # two eps per threat: each threat model has its two budgets and the all-attacks row
    assert len(rows) == 2 * 3 and {r["Threat model"] for r in rows} == {"transfer", "adaptive"}
    for row in rows:
        assert row["Clean acc."] == pct(truth["clean_accuracy"]["dundi"])
        assert row["Certified acc."] == "—"  # an uncertified run
        if row["Budget"] == "all attacks":
            w = next(w for w in truth["worst_case"] if w["threat"] == row["Threat model"] and w["norm"] == "any")
        else:
            norm, _, eps = row["Budget"].split()
            w = worst[(row["Threat model"], norm, float(eps))]
        assert row["Worst-case robust acc."] == pct(w["robust_accuracy"])
        assert row["Samples"] == f"{w['count']:,} of 2,000" == "24 of 2,000"
    # the same rows, unrounded, in report.json
    assert {(r["threat"], r["norm"], r["eps"]): r["robust_accuracy"] for r in figures["summary"]
            if r["norm"] != "any"} == {k: w["robust_accuracy"] for k, w in worst.items()}


def test_summary_rows_add_certified_accuracy_at_matching_eps(evaluation):
    """Certified accuracy goes beside the worst case at the same L-inf eps; an eps that only
    the certificate covers gets its own row (no attack, so no robust accuracy)."""
    from dundi.evaluation.report import Evaluation, summary_rows

    ev = Evaluation(evaluation)
    ev.certified = [{"eps": 0.1, "count": 24, "certified_accuracy": 0.25},
                    {"eps": 0.2, "count": 24, "certified_accuracy": 0.125}]
    rows = summary_rows(ev)
    at = {(r["threat"], r["norm"], r["eps"]): r for r in rows}
    assert at[("adaptive", "Linf", 0.1)]["certified_accuracy"] == 0.25
    assert at[("transfer", "Linf", 0.1)]["certified_accuracy"] == 0.25
    assert at[("adaptive", "Linf", 0.3)]["certified_accuracy"] is None
    proof_only = at[(None, "Linf", 0.2)]
    assert proof_only["robust_accuracy"] is None and proof_only["certified_accuracy"] == 0.125


def test_report_wording_explains_its_columns(evaluation, tmp_path):
    write_report([evaluation], tmp_path / "r")
    text = (tmp_path / "r" / "report.md").read_text()
    assert "m = min(m, n)" not in text and "min(m, n) coarse oracles per class" in text
    robust = sections(text)["Robust accuracy per threat model"]
    assert "Native robust acc." in robust and "crafted on DunDi, so the native column shows how" in robust


def test_plot_axes_stay_legible_with_one_eps_and_zero_values(evaluation, tmp_path):
    """One eps, a 0 % curve and zero-height bars: the eps axis starts at 0 and is ticked at the
    evaluated eps, the percent axis leaves room below 0, every bar carries its value label,
    and every title names dataset, threat model and sample size."""
    from matplotlib.figure import Figure

    import dundi.evaluation.report as report
    import dundi.evaluation.report_plots as plots

    ev = report.Evaluation(evaluation)
    ev.attacks = [dict(r, robust_accuracy=0.0) for r in ev.attacks if r["eps"] == 0.3]
    ev.worst = [dict(w, robust_accuracy=0.0) for w in ev.worst if w["eps"] == 0.3]
    saved: list[Figure] = []
    real_save = plots._save
    plots._save = lambda fig, path: (saved.append(fig), real_save(fig, path))[1]
    try:
        report.plot_robust_vs_eps(ev, tmp_path / "robust.png")
        for r in ev.attacks:
            r["defense_success"] = 0.0
        ev.rows = lambda threat: [r for r in ev.attacks if r["threat"] == threat]
        settings = sorted({(r["attack"], r["eps"]) for r in ev.rows("transfer")})
        report.plot_defense_bars([ev], settings, tmp_path / "bars.png")
    finally:
        plots._save = real_save
    robust, bars = saved
    for ax in robust.axes:
        lo, hi = ax.get_xlim()
        assert lo == 0 and hi > 0.3 and 0.3 in list(ax.get_xticks())
        assert ax.get_ylim()[0] < 0  # 0 % markers sit above the axis line
        title = " ".join(ax.get_title().replace("\u00a0", " ").split())
        assert "mnist-10k" in title and "24 samples" in title and ("transfer" in title or "adaptive" in title)
    (ax,) = bars.axes
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == len(settings) and set(labels) == {"0.0%"}
    title = " ".join(ax.get_title().replace("\u00a0", " ").split())
    assert ax.get_ylim()[0] < 0 and "transfer" in title and "24 samples" in title
