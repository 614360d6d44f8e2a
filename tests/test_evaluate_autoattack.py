"""AutoAttack through the evaluation (shards, Parquet, Ray), the stand-in/rule disagreement
figure, refused settings, and shards that never hold another slice's rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dundi.errors import DundiError
from dundi.evaluation.config import EvalConfig
from dundi.evaluation.evaluate import evaluate_local
from dundi.evaluation.results import SCHEMA, read_results, shard_path, write_shard
from dundi.evaluation.summary import summarize


@pytest.fixture(scope="module")
def aa_cfg(mnist_runs, data_dir) -> EvalConfig:
    return EvalConfig(run=str(mnist_runs["dundi"]), native=str(mnist_runs["native"]),
                      attacks=["autoattack"], threats=["adaptive"], eps=[0.3], steps=5,
                      attack_kw={"n_queries": 40}, limit=16, shard_size=8, n_values=[10], k=3,
                      data_dir=data_dir)


@pytest.mark.parametrize("args, words", [
    (["--attacks", "pgd", "--attack-arg", "restart=5"], ["restart", "accepted keys", "restarts"]),
    (["--attacks", "pgd", "--attack-arg", "restarts=abc"], ["restarts=abc", "an integer"]),
    (["--attacks", "autoattack", "--attack-arg", "n_queries=1.5"], ["n_queries", "an integer"]),
    (["--attacks", "pgd", "--steps", "0"], ["--steps", "at least 1"]),
    (["--attacks", "pgd", "--steps", "-1"], ["--steps", "at least 1"]),
    (["--attacks", "pgd", "--eps", "1.5"], ["(0, 1]", "1.5"]),
    (["--attacks", "autoattack", "--eps", "0"], ["(0, 1]"]),
    (["--attacks", "apgd-step1", "--threat", "feature"], ["--threat adaptive"]),
])
def test_bad_settings_are_refused_in_one_line(mnist_runs, tmp_path, capsys, args, words):
    from dundi.cli.main import main

    base = ["evaluate", str(mnist_runs["dundi"]), "--out", str(tmp_path / "e"), "--workers", "0"]
    if "--threat" not in args:
        args = args + ["--threat", "adaptive"]
    try:  # argparse-level checks (--steps) exit, the others return the code
        code = main(base + args)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert not (tmp_path / "e" / "shards").exists()  # refused before any work
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def test_a_shard_of_another_length_is_never_written(tmp_path):
    table = SCHEMA.empty_table()
    with pytest.raises(DundiError, match="0 rows for a slice of 8"):
        write_shard(tmp_path, "adaptive__x__eps0.3__0000000-0000008", table, "f", rows=8)
    assert not shard_path(tmp_path, "adaptive__x__eps0.3__0000000-0000008").exists()


@pytest.mark.realdata
def test_autoattack_on_the_exact_rule_reports_disagreement(aa_cfg, tmp_path):
    out = tmp_path / "aa"
    evaluate_local(aa_cfg, out, progress=False, log=lambda s: None)
    table = read_results(out, require_complete=True)
    assert table.num_rows == 16
    summary = summarize(out)
    (row,) = summary["attacks"]
    assert row["attack"] == "autoattack[n_queries=40,steps=5]" and row["k"] == 3
    assert row["rule_disagreement"] is not None and 0 <= row["rule_disagreement"] <= 1
    rows = table.to_pylist()
    expected = np.mean([r["target_adv"] != r["dundi_adv"] for r in rows])
    assert row["rule_disagreement"] == pytest.approx(expected)
    assert all(r["linf"] <= 0.3 + 1e-6 for r in rows)
    # the stand-in is the rule: clean labels agree exactly
    assert all(r["target_clean"] == r["dundi_clean"] for r in rows)


@pytest.mark.ray
@pytest.mark.realdata
def test_ray_workers_keep_one_evaluator_per_sample_list(aa_cfg, ray_local, tmp_path):
    """Two evaluations of one run that differ only in --limit, in one Ray session whose
    worker processes are reused: each shard holds its own slice's rows."""
    from dundi.distributed.evaluate_job import evaluate_on_ray

    small = dataclasses.replace(aa_cfg, limit=8)
    evaluate_on_ray(small, tmp_path / "small", workers=2, progress=False, log=lambda s: None)
    evaluate_on_ray(aa_cfg, tmp_path / "large", workers=2, progress=False, log=lambda s: None)
    large = read_results(tmp_path / "large", require_complete=True)
    assert large.num_rows == 16
    assert sorted(large.column("position").to_pylist()) == list(range(16))
    local = tmp_path / "local"
    evaluate_local(aa_cfg, local, progress=False, log=lambda s: None)
    key = lambda r: r["position"]  # noqa: E731
    assert sorted(read_results(local).to_pylist(), key=key) == sorted(large.to_pylist(), key=key)


def test_disagreement_above_one_percent_warns():
    from dundi.evaluation.summary import checks

    row = {"threat": "adaptive", "attack": "pgd", "eps": 0.3, "norm": "Linf", "target_model": "x",
           "zero_gradient_fraction": 0.0, "robust_accuracy": 0.5, "rule_disagreement": 0.02}
    assert any("differs from the two-step rule" in w for w in checks([row]))
    assert not checks([{**row, "rule_disagreement": 0.005}])
    assert not checks([{**row, "rule_disagreement": float("nan")}])


