"""`dundi demo --quick` end to end on real mnist-10k, and its resume behaviour."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_demo_quick_produces_table1_and_resumes(tmp_path, data_dir):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "dundi", "demo", "--quick", "--no-progress", "--out", str(out),
           "--data-dir", data_dir, "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    figures = json.loads(first.stdout.strip().splitlines()[-1])
    table = (out / "table1.md").read_text()
    for row in ("Native Model3 (LeNet-5)", "DunDi_R3", "DunDi_P3"):
        assert row in table
    summary = json.loads((out / "table1.json").read_text())
    assert summary["dataset"] == "mnist-10k" and summary["test_count"] == 2000
    assert figures["native_accuracy"] > 0.85
    for name in ("DunDi_R3", "DunDi_P3"):
        for n in (1, 10, 20):
            assert 0.5 < figures[f"{name}_n{n}"] <= 1.0
    report = open(figures["report"]).read()
    for needed in ("transfer", "adaptive", "clean", "eps", "mnist-10k"):
        assert needed in report, needed
    # a second run finds every stage done: no model is retrained
    weights = [p for p in out.rglob("model.safetensors")]
    before = {p: p.stat().st_mtime_ns for p in weights}
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in weights} == before
    assert json.loads(second.stdout.strip().splitlines()[-1])["DunDi_R3_n20"] == figures["DunDi_R3_n20"]
