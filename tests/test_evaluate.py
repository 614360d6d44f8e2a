"""Adversarial evaluation on a small real mnist-10k slice: Ray fan-out to Parquet, one row per
key, invariants recomputed from the saved adversarial images, kill-and-restart, the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dundi.data import load_split
from dundi.errors import DundiError
from dundi.evaluation.config import EvalConfig
from dundi.evaluation.evaluate import evaluate_local, prepare
from dundi.evaluation.plan import select_samples
from dundi.evaluation.shard import adv_images
from dundi.evaluation.results import KEY, finished_shards, read_evaluation, read_results, shard_path
from dundi.rule.params import TwoStepRule
from dundi.run.directory import Run

LIMIT = 32


def keys(table) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in KEY)))


def sorted_rows(table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: (r["threat"], r["attack"], r["eps"], r["sample_id"]))


@pytest.fixture(scope="module")
def cfg(mnist_runs, data_dir) -> EvalConfig:
    return EvalConfig(run=str(mnist_runs["dundi"]), native=str(mnist_runs["native"]),
                      attacks=["fgsm", "ifgsm-a"], threats=["transfer", "adaptive"], eps=[0.3],
                      steps=5, limit=LIMIT, shard_size=16, n_values=[1, 5, 10], save_adv=True,
                      data_dir=data_dir)


@pytest.fixture(scope="module")
def ray_results(cfg, ray_local, tmp_path_factory):
    from dundi.distributed.evaluate_job import evaluate_on_ray

    out = tmp_path_factory.mktemp("eval-ray")
    timing = evaluate_on_ray(cfg, out, workers=2, progress=False, log=lambda s: None)
    return out, timing


@pytest.mark.ray
@pytest.mark.realdata
def test_ray_evaluation_writes_one_row_per_key_with_sound_invariants(cfg, ray_results, data_dir):
    out, timing = ray_results
    assert timing["shards_run"] == 8 and timing["shards_skipped"] == 0
    table = read_results(out, require_complete=True)
    # rows name an attack with the settings given explicitly: --steps 5 reaches BIM, not FGSM
    expected = {(i, a, 0.3, t) for t in cfg.threats for a in ("fgsm", "ifgsm-a[steps=5]")
                for i in table.column("sample_id").to_pylist()}
    assert len(set(table.column("sample_id").to_pylist())) == LIMIT
    assert sorted(keys(table)) == sorted(expected)  # exactly one row per key

    rows = table.to_pylist()
    for r in rows:
        assert r["norm"] == "Linf" and r["eps"] == 0.3 and r["dataset"] == "mnist-10k"
        assert r["linf"] <= r["eps"] + 1e-6
        assert 0.0 <= r["adv_min"] and r["adv_max"] <= 1.0
        assert r["defense_success"] == (r["dundi_adv"] == r["label"])
        assert r["attack_success"] == (r["target_adv"] != r["label"])
        assert 1 <= r["steps_used"] <= r["steps"]
        assert r["n_values"] == [1, 5, 10] and r["dundi_adv_at_n"][-1] == r["dundi_adv"]
    assert {r["steps"] for r in rows if r["attack"] == "fgsm"} == {1}
    assert {r["steps"] for r in rows if r["attack"] == "ifgsm-a[steps=5]"} == {5}

    # recompute everything from the saved adversarial images and the clean test split
    images, labels, ids = load_split("mnist-10k", "test", data_dir)
    pos = select_samples(len(labels), LIMIT, cfg.seed)
    by_id = {int(i): k for k, i in enumerate(ids)}
    clean = images[[by_id[i] for i in table.column("sample_id").to_pylist()]]
    assert table.column("label").to_pylist() == [int(labels[by_id[i]]) for i in table.column("sample_id").to_pylist()]
    assert set(table.column("sample_id").to_pylist()) == set(ids[pos].tolist())
    adv = adv_images(table, images.shape[1:])
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    diff = (adv.astype(np.float64) - clean.astype(np.float64)).reshape(len(adv), -1)
    np.testing.assert_allclose(np.abs(diff).max(1), table.column("linf").to_numpy(), atol=1e-7)
    np.testing.assert_allclose(np.sqrt((diff ** 2).sum(1)), table.column("l2").to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal((np.abs(diff) > 1e-6).sum(1), table.column("l0").to_numpy())
    assert np.abs(diff).max() <= 0.3 + 1e-6
    dundi, native = Run.load(cfg.run), Run.load(cfg.native)
    np.testing.assert_array_equal(dundi.classify(adv, TwoStepRule(10, 3, 5)).labels, table.column("dundi_adv").to_numpy())
    np.testing.assert_array_equal(dundi.classify(clean, TwoStepRule(10, 3, 5)).labels, table.column("dundi_clean").to_numpy())
    np.testing.assert_array_equal(native.embed(adv).argmax(1), table.column("native_adv").to_numpy())

    # transfer samples are crafted on the native model: they fool it far more often than not
    transfer = [r for r in rows if r["threat"] == "transfer" and r["attack"] == "fgsm"]
    assert np.mean([r["native_adv"] != r["label"] for r in transfer]) > 0.5


@pytest.mark.ray
@pytest.mark.realdata
def test_killed_evaluation_restarts_from_finished_shards(cfg, ray_results, ray_local, tmp_path):
    from dundi.distributed.evaluate_job import evaluate_on_ray

    out = tmp_path / "eval"
    first = evaluate_on_ray(cfg, out, workers=2, progress=False, max_shards=3, log=lambda s: None)
    assert first["shards_run"] == 3
    done = finished_shards(out, read_evaluation(out)["fingerprint"])
    assert len(done) == 3
    stamps = {name: (p.stat().st_mtime_ns, p.read_bytes()) for name, p in done.items()}
    plan = read_evaluation(out)["plan"]
    unfinished = [name for name in plan if name not in done]
    # the kill left a half-written temporary file and, worse, a truncated shard file
    partial = shard_path(out, unfinished[0]).with_name(f"{unfinished[0]}.parquet.tmp99999")
    partial.write_bytes(b"PAR1\x00\x00 killed mid-write")
    shard_path(out, unfinished[1]).write_bytes(b"PAR1 truncated")
    with pytest.raises(DundiError, match="not finished"):
        read_results(out, require_complete=True)

    second = evaluate_on_ray(cfg, out, workers=2, progress=False, log=lambda s: None)
    assert second["shards_skipped"] == 3 and second["shards_run"] == len(plan) - 3
    for name, (mtime, data) in stamps.items():  # finished shards were not recomputed
        path = shard_path(out, name)
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data
    pq.read_table(shard_path(out, unfinished[1]))  # the truncated shard was rewritten
    table = read_results(out, require_complete=True)
    assert len(keys(table)) == len(set(keys(table))) == LIMIT * 4
    # and the interrupted evaluation equals the uninterrupted one, row for row
    assert sorted_rows(table) == sorted_rows(read_results(ray_results[0]))

    third = evaluate_on_ray(cfg, out, workers=2, progress=False, log=lambda s: None)
    assert third["shards_run"] == 0 and third["shards_skipped"] == len(plan)


@pytest.mark.realdata
def test_local_evaluation_equals_ray_and_refuses_other_settings(cfg, ray_results, tmp_path):
    out = tmp_path / "local"
    timing = evaluate_local(cfg, out, progress=False, max_shards=1, log=lambda s: None)
    assert timing["shards_run"] == 1
    (name, path), = finished_shards(out).items()
    ray_table = pq.read_table(shard_path(ray_results[0], name))
    assert pq.read_table(path).to_pylist() == ray_table.to_pylist()
    with pytest.raises(DundiError, match="other weights or settings"):
        prepare(dataclasses.replace(cfg, n=5), out)


@pytest.mark.realdata
def test_cli_evaluate_json_and_accumulating_settings(mnist_runs, data_dir, tmp_path, capsys):
    from dundi.cli.main import main

    out = tmp_path / "cli"
    base = ["evaluate", str(mnist_runs["dundi"]), "--native", str(mnist_runs["native"]), "--limit", "16",
            "--shard-size", "16", "--workers", "0", "--out", str(out), "--data-dir", data_dir,
            "--no-progress", "--json"]
    assert main(base + ["--attacks", "fgsm", "--threat", "transfer", "feature", "--eps", "0.1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 32 and summary["dataset"] == "mnist-10k"
    for row in summary["attacks"]:
        for field in ("dataset", "clean_accuracy_dundi", "attack", "norm", "eps", "steps", "threat",
                      "defense_success", "robust_accuracy"):
            assert row[field] is not None, field
    assert {w["threat"] for w in summary["worst_case"]} == {"transfer", "feature"}

    # a second call with another attack adds its shards; the first ones stay in the plan
    assert main(base + ["--attacks", "jsma", "--threat", "transfer", "--attack-arg", "gamma=0.05"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 48
    jsma = next(r for r in summary["attacks"] if r["attack"] == "jsma[gamma=0.05]")
    assert jsma["norm"] == "L0" and jsma["eps"] == 0.05 and jsma["steps"] == 19
    rows = read_results(out).to_pylist()
    jsma_rows = [r for r in rows if r["attack"] == "jsma[gamma=0.05]"]
    assert len(jsma_rows) == 16 and all(r["l0"] <= 2 * 19 for r in jsma_rows)
    assert all(r["target_class"] not in (-1, r["label"]) for r in jsma_rows)

    assert main(["evaluate", str(mnist_runs["dundi"]), "--attacks", "fgsm", "--out", str(tmp_path / "x"),
                 "--workers", "0"]) == 2  # transfer without --native: a one-line error
    assert "--native" in capsys.readouterr().err


def test_variants_of_one_attack_are_separate_rows_and_sum_into_the_worst_case(mnist_runs, data_dir, tmp_path):
    """PGD with CE and with the margin loss at one eps, evaluated by two calls into one
    directory: both stay, each under its own name, and the worst case needs both."""
    from dundi.evaluation.summary import summarize

    base = EvalConfig(run=str(mnist_runs["dundi"]), attacks=["pgd"], threats=["adaptive"], eps=[0.1],
                      steps=3, limit=16, shard_size=16, data_dir=data_dir)
    for loss in ("ce", "margin"):
        evaluate_local(dataclasses.replace(base, attack_kw={"loss": loss}), tmp_path, progress=False,
                       log=lambda s: None)
    summary = summarize(tmp_path)
    names = sorted(r["attack"] for r in summary["attacks"])
    assert names == ["pgd[loss=ce,steps=3]", "pgd[loss=margin,steps=3]"] and summary["rows"] == 32
    by = {r["attack"]: r for r in summary["attacks"]}
    assert {json.loads(json.dumps(r["attack_params"]))["loss"] for r in by.values()} == {"ce", "margin"}
    rows = read_results(tmp_path).to_pylist()
    robust = {}
    for r in rows:
        robust.setdefault(r["sample_id"], []).append(r["dundi_clean"] == r["label"] == r["dundi_adv"])
    worst = next(w for w in summary["worst_case"] if w["norm"] == "Linf")
    assert worst["count"] == 16
    assert worst["robust_accuracy"] == pytest.approx(np.mean([all(v) for v in robust.values()]))


def test_attacks_on_distance_scores_default_to_the_margin_loss():
    """Adaptive and feature attacks climb the CW margin (softmax CE over summed distances
    saturates); the transfer attack keeps the paper's CE; --attack-arg loss=... wins."""
    import torch

    from dundi.evaluation.plan import make_attack_for

    cfg = EvalConfig(run="r", native="n", attacks=["pgd"], threats=["transfer", "adaptive", "feature"])
    loss_of = lambda threat, c=cfg: make_attack_for("pgd", torch.nn.Identity(), 0.3, c, "mnist-10k", 0, threat).loss
    assert [loss_of(t) for t in ("transfer", "adaptive", "feature")] == ["ce", "margin", "margin"]
    forced = dataclasses.replace(cfg, attack_kw={"loss": "ce"})
    assert loss_of("adaptive", forced) == "ce"


def test_model_names_follow_the_paper_and_mark_adversarial_training():
    from dundi.evaluation.plan import model_name

    assert model_name({"kind": "dundi", "arch": "lenet5", "mode": "P"}) == "DunDi_P3"
    assert model_name({"kind": "dundi", "arch": "lenet1", "mode": "R", "adversarial": True}) == "DunDi-AT_R1"
    assert model_name({"kind": "native", "arch": "lenet4"}) == "Native Model2"
    assert model_name({"kind": "native", "arch": "lenet5", "adversarial": True}) == "Madry-AT Model3"
