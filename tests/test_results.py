"""Parquet rows and summaries (no Ray, no models): atomic shards, the merge to one row per key,
and the summaries against brute-force pure-Python references."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from dundi.errors import DundiError
from dundi.evaluation.results import (
    EVALUATION_FILE,
    SCHEMA,
    finished_shards,
    read_results,
    shard_name,
    shard_path,
    write_shard,
)
from dundi.evaluation.summary import attack_summary, checks, clean_accuracy, worst_case

FP = "f" * 16


def synthetic_rows(seed: int = 0, samples: int = 40, attacks=("fgsm", "pgd", "square"),
                   threats=("transfer", "adaptive"), eps=(0.1, 0.3)) -> list[dict]:
    """Random but consistent rows: clean predictions fixed per sample, adversarial ones random."""
    rng = random.Random(seed)
    clean = {i: (rng.randrange(3), rng.randrange(3), rng.randrange(3)) for i in range(samples)}
    rows = []
    for threat in threats:
        for attack in attacks:
            for e in eps:
                for i in range(samples):
                    label, native_clean, dundi_clean = clean[i]
                    native_adv, dundi_adv, target_adv = rng.randrange(3), rng.randrange(3), rng.randrange(3)
                    rows.append({
                        "sample_id": 1000 + i, "position": i, "attack": attack, "eps": e, "threat": threat,
                        "dataset": "synthetic", "split": "test", "label": label, "norm": "Linf",
                        "steps": 10, "steps_used": rng.randrange(1, 11), "attack_params": json.dumps({"eps": e}),
                        "target_model": "m", "native_clean": native_clean, "native_adv": native_adv,
                        "dundi_clean": dundi_clean, "dundi_adv": dundi_adv, "target_clean": native_clean,
                        "target_adv": target_adv, "n": 10, "m": 3, "k": 3, "n_values": [1, 10],
                        "dundi_clean_at_n": [rng.randrange(3), dundi_clean], "dundi_adv_at_n": [0, dundi_adv],
                        "l0": 5, "l2": 1.0, "linf": e, "adv_min": 0.0, "adv_max": 1.0,
                        "grad_norm": 0.0 if rng.random() < 0.02 else 1.0, "target_class": -1,
                        "attack_success": target_adv != label, "defense_success": dundi_adv == label,
                        "adv": None})
    return rows


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_evaluation(out, plan: list[str], fingerprint: str = FP) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / EVALUATION_FILE).write_text(json.dumps({"fingerprint": fingerprint, "plan": plan,
                                                   "dataset": "synthetic", "shards": {}}))


def test_shards_are_atomic_and_partial_files_are_ignored(tmp_path):
    rows = synthetic_rows(samples=8, attacks=("fgsm",), threats=("transfer",), eps=(0.3,))
    name = shard_name("fgsm", 0.3, "transfer", 0, 8)
    write_shard(tmp_path, name, to_table(rows), FP)
    # a write killed half-way leaves a temporary file; an unreadable .parquet is no shard either
    (shard_path(tmp_path, name).parent / f"{name}.parquet.tmp4242").write_bytes(b"PAR1 half a file")
    broken = shard_name("fgsm", 0.3, "transfer", 8, 16)
    shard_path(tmp_path, broken).write_bytes(b"PAR1 truncated")
    other = shard_name("pgd", 0.3, "transfer", 0, 8)
    write_shard(tmp_path, other, to_table(rows), "another-config")
    assert set(finished_shards(tmp_path, FP)) == {name}
    assert set(finished_shards(tmp_path)) == {name, other}
    assert not list(shard_path(tmp_path, name).parent.glob(f"*.tmp{__import__('os').getpid()}"))

    write_evaluation(tmp_path, [name, broken])
    with pytest.raises(DundiError, match="not finished"):
        read_results(tmp_path, require_complete=True)
    table = read_results(tmp_path)
    assert table.num_rows == 8 and table.schema.equals(SCHEMA)


def test_read_results_refuses_duplicate_keys(tmp_path):
    rows = synthetic_rows(samples=8, attacks=("fgsm",), threats=("transfer",), eps=(0.3,))
    a, b = shard_name("fgsm", 0.3, "transfer", 0, 8), shard_name("fgsm", 0.3, "transfer", 0, 9)
    write_shard(tmp_path, a, to_table(rows), FP)
    write_shard(tmp_path, b, to_table(rows[:3]), FP)
    write_evaluation(tmp_path, [a])
    assert read_results(tmp_path).num_rows == 8  # a shard outside the plan is not read
    write_evaluation(tmp_path, [a, b])
    with pytest.raises(DundiError, match="more than once"):
        read_results(tmp_path)


def reference_worst_case(rows: list[dict], threat: str, norm: str, eps: float | None, model: str):
    """Per sample: robust iff correct clean and under every (attack, eps' ≤ eps) of the group;
    only samples that every (attack, eps') of the group evaluated count."""
    group = [r for r in rows if r["threat"] == threat and (norm == "any" or (r["norm"] == norm and r["eps"] <= eps))]
    settings = {(r["attack"], r["eps"]) for r in group}
    per_sample: dict[int, dict] = {}
    for r in group:
        ok = r[f"{model}_clean"] == r["label"] and r[f"{model}_adv"] == r["label"]
        per_sample.setdefault(r["sample_id"], {})[(r["attack"], r["eps"])] = ok
    complete = [flags for flags in per_sample.values() if set(flags) == settings]
    robust = sum(1 for flags in complete if all(flags.values()))
    return robust / len(complete), len(complete)


def test_worst_case_matches_brute_force_reference():
    rows = synthetic_rows(seed=3)
    rows = [r for r in rows if not (r["attack"] == "pgd" and r["sample_id"] == 1005)]  # one gap
    result = worst_case(to_table(rows))
    assert {(w["threat"], w["norm"]) for w in result} == {(t, n) for t in ("transfer", "adaptive")
                                                          for n in ("Linf", "any")}
    for w in result:
        eps = None if w["norm"] == "any" else w["eps"]
        for model, key in (("dundi", "robust_accuracy"), ("native", "native_robust_accuracy")):
            expected, count = reference_worst_case(rows, w["threat"], w["norm"], eps, model)
            assert w[key] == pytest.approx(expected)
            assert w["count"] == count
    # robust accuracy cannot rise with eps: the eps-0.3 group holds the eps-0.1 attacks too
    for threat in ("transfer", "adaptive"):
        curve = sorted((w["eps"], w["robust_accuracy"], w["settings"]) for w in result
                       if w["threat"] == threat and w["norm"] == "Linf")
        assert curve[1][1] <= curve[0][1] and set(curve[0][2]) < set(curve[1][2])
    # worst case can only be lower than every single attack of its group
    summary = attack_summary(to_table(rows))
    for w in result:
        if w["norm"] == "any":
            singles = [r["robust_accuracy"] for r in summary if r["threat"] == w["threat"]]
            assert w["robust_accuracy"] <= min(singles) + 1e-12


def test_attack_summary_matches_reference():
    rows = synthetic_rows(seed=5)
    summary = attack_summary(to_table(rows))
    assert len(summary) == 2 * 3 * 2
    for s in summary:
        group = [r for r in rows if (r["threat"], r["attack"], r["eps"]) == (s["threat"], s["attack"], s["eps"])]
        n = len(group)
        assert s["count"] == n
        assert s["defense_success"] == pytest.approx(sum(r["dundi_adv"] == r["label"] for r in group) / n)
        assert s["robust_accuracy"] == pytest.approx(
            sum(r["dundi_adv"] == r["label"] and r["dundi_clean"] == r["label"] for r in group) / n)
        assert s["clean_accuracy_dundi"] == pytest.approx(sum(r["dundi_clean"] == r["label"] for r in group) / n)
        fooled = [r for r in group if r["native_clean"] == r["label"] and r["native_adv"] != r["label"]]
        assert s["native_fooled"] == len(fooled)
        if fooled:
            assert s["defense_success_fooled"] == pytest.approx(
                sum(r["dundi_adv"] == r["label"] for r in fooled) / len(fooled))
        assert s["attack_success_rate"] == pytest.approx(sum(r["target_adv"] != r["label"] for r in group) / n)
        for field in ("norm", "eps", "steps", "threat", "dataset", "n", "m", "k"):
            assert s[field] is not None


def test_clean_accuracy_over_distinct_samples():
    rows = synthetic_rows(seed=7, samples=30)
    clean = clean_accuracy(to_table(rows))
    first = {r["sample_id"]: r for r in reversed(rows)}
    assert clean["count"] == 30
    assert clean["dundi"] == pytest.approx(sum(r["dundi_clean"] == r["label"] for r in first.values()) / 30)
    assert clean["native"] == pytest.approx(sum(r["native_clean"] == r["label"] for r in first.values()) / 30)
    assert set(clean["dundi_at_n"]) == {1, 10}
    assert clean["dundi_at_n"][10] == clean["dundi"]
    rows[1]["dundi_clean"] = (rows[1]["dundi_clean"] + 1) % 3  # a sample's rows disagree
    with pytest.raises(DundiError, match="differ"):
        clean_accuracy(to_table(rows))


@pytest.mark.parametrize("square", ["square", "square[steps=2000]"])
def test_checks_warn_on_zero_gradients_and_black_box_beating_white_box(square):
    """Also when the attacks carry their settings in their names (see evaluate.attack_label)."""
    rows = synthetic_rows(seed=1, samples=20, attacks=("fgsm", square), threats=("adaptive",), eps=(0.3,))
    for r in rows:
        if r["attack"] == "fgsm":  # the white-box attack fails everywhere, with no gradient
            r["dundi_adv"], r["grad_norm"] = r["label"], 0.0
        else:
            r["dundi_adv"], r["grad_norm"] = (r["label"] + 1) % 3, 1.0
    warnings = checks(attack_summary(to_table(rows)))
    assert any("gradient is exactly zero" in w and "fgsm" in w for w in warnings)
    assert any(f"black-box {square}" in w for w in warnings)
    for r in rows:  # the stand-in agrees with the rule too (else that is warned about)
        r["grad_norm"], r["dundi_adv"], r["target_adv"] = 1.0, r["label"], r["label"]
    assert checks(attack_summary(to_table(rows))) == []


def test_published_names_are_relative_to_the_repository(tmp_path):
    from dundi.evaluation.results import repo_relative

    assert repo_relative(tmp_path / "runs" / "at5", root=tmp_path) == "runs/at5"
    assert repo_relative(tmp_path, root=tmp_path) == "."
    outside = repo_relative("/somewhere/else/runs/at5", root=tmp_path)
    assert outside == "<outside>/runs/at5" and not outside.startswith("/")


def test_published_files_carry_no_machine_paths():
    """docs/ is published: a report or log there must not name this machine's directories."""
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    pattern = re.compile(r"(?<![\w.])/(?:work|tmp|home|root|Users|private/var|mnt|scratch)/[\w.-]")
    found = [f"{path.relative_to(docs.parent)}: {m.group(0)}" for path in docs.rglob("*")
             if path.suffix in (".md", ".json", ".txt", ".tsv", ".sh") for m in pattern.finditer(path.read_text())]
    assert not found, f"machine paths in published files: {found[:5]}"
