"""The report: Markdown tables and PNG plots from real (small) evaluations, and every
robustness table stating dataset, clean accuracy, attack, norm, eps, steps and threat model."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from dundi.evaluate import EvalConfig, evaluate_local
from dundi.report import demo_report, write_report

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
    # a rerun finds every shard finished and only rewrites the report
    again = demo_report(mnist_runs["native"], {"DunDi_R3": mnist_runs["dundi"]}, tmp_path, data_dir,
                        progress=False, log=lambda s: None, limit=8, steps=2)
    assert again["report"] == figures["report"]
