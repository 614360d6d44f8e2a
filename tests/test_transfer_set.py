"""The shared-source transfer protocol (`dundi transfer`): the set it crafts is the one
`dundi evaluate --threat transfer` crafts, every target's answers are what the run serves, a
rerun reuses finished sets, and bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dundi.errors import DundiError
from dundi.evaluation.config import EvalConfig
from dundi.evaluation.evaluate import evaluate_local
from dundi.evaluation.results import read_results
from dundi.evaluation.shard import adv_images
from dundi.evaluation.transfer_set import ROWS_FILE, SET_DIR, TRANSFER_FILE, TransferConfig, run_transfer
from dundi.run.directory import Run

ATTACKS = ["fgsm", "ifgsm-a", "jsma"]
LIMIT = 24


@pytest.fixture(scope="module")
def crafted(mnist_runs, data_dir, tmp_path_factory):
    """One transfer on the shared small runs: source the native LeNet-5, targets the DunDi run
    and the source itself; JSMA's gamma cut so the test stays short."""
    out = tmp_path_factory.mktemp("transfer")
    cfg = TransferConfig(str(mnist_runs["native"]), [str(mnist_runs["dundi"]), str(mnist_runs["native"])],
                         attacks=ATTACKS, limit=LIMIT, batch_size=8, attack_kw={"gamma": 0.03}, data_dir=data_dir)
    logs: list[str] = []
    summary = run_transfer(cfg, out, log=logs.append)
    return cfg, out, summary, logs


def _sets(out) -> dict[str, dict[str, np.ndarray]]:
    """Every crafted set by the attack name its rows carry."""
    sets = {}
    for path in sorted((out / SET_DIR).glob("*.npz")):
        with np.load(path, allow_pickle=False) as f:
            sets[str(f["attack"])] = {k: f[k] for k in f.files}
    return sets


def test_the_set_is_the_one_evaluate_crafts_and_the_answers_are_its_rows(crafted, mnist_runs, data_dir, tmp_path):
    """An evaluation of the DunDi run with the same source as its native model, in shards of
    another size, crafts the same images (bit for bit) and its two-step and native columns
    are the transfer rows' answers."""
    cfg, out, summary, _ = crafted
    ecfg = EvalConfig(run=str(mnist_runs["dundi"]), native=str(mnist_runs["native"]), attacks=ATTACKS,
                      threats=["transfer"], limit=LIMIT, shard_size=16, save_adv=True,
                      attack_kw={"gamma": 0.03}, data_dir=data_dir)
    evaluate_local(ecfg, tmp_path / "eval", progress=False, threads=1)
    evaluated = read_results(tmp_path / "eval")
    rows = pq.read_table(out / ROWS_FILE)
    dundi_target = summary["targets"][0]["target"]  # targets keep the order they were given in
    sets = _sets(out)
    assert sorted(sets) == sorted(set(evaluated.column("attack").to_pylist())) and len(sets) == len(ATTACKS)
    for attack, crafted_set in sets.items():
        ev = evaluated.filter(np.asarray(evaluated.column("attack").to_pylist()) == attack)
        ev_ids = np.asarray(ev.column("sample_id").to_pylist())
        ids, adv = crafted_set["sample_id"], crafted_set["adv"]
        assert len(ev_ids) == LIMIT
        order = {int(i): p for p, i in enumerate(ids)}
        pos = np.array([order[int(i)] for i in ev_ids])
        np.testing.assert_array_equal(adv_images(ev, adv.shape[1:]), adv[pos])
        mine = rows.filter((np.asarray(rows.column("attack").to_pylist()) == attack)
                           & (np.asarray(rows.column("target").to_pylist()) == dundi_target))
        by_id = dict(zip(mine.column("sample_id").to_pylist(), mine.column("target_adv").to_pylist()))
        src = dict(zip(mine.column("sample_id").to_pylist(), mine.column("source_adv").to_pylist()))
        assert [by_id[i] for i in ev_ids] == ev.column("dundi_adv").to_pylist()
        assert [src[i] for i in ev_ids] == ev.column("native_adv").to_pylist()


def test_figures_are_counts_of_answers_the_runs_give_again(crafted, mnist_runs):
    """Brute force: classify every saved adversarial image again through Run.classify and
    count; the summary's defense success and clean accuracy are those counts."""
    cfg, out, summary, _ = crafted
    assert summary["count"] == LIMIT
    runs = {t["target"]: Run.load(path) for t, path in zip(summary["targets"], cfg.targets)}
    for attack, crafted_set in _sets(out).items():
        adv, labels = crafted_set["adv"], crafted_set["label"]
        assert adv.min() >= 0 and adv.max() <= 1
        for t in summary["targets"]:
            right = int((runs[t["target"]].classify(adv).labels == labels).sum())
            assert t["attacks"][attack]["correct"] == right
            assert t["attacks"][attack]["count"] == LIMIT
    source = next(t for t in summary["targets"] if t["kind"] == "native")
    for a in summary["attacks"]:  # the source scored on its own set is the white-box figure
        assert source["attacks"][a["attack"]]["defense_success"] == pytest.approx(a["source_accuracy_adv"])
        if not a["attack"].startswith("jsma"):
            assert a["max_linf"] <= 0.3 + 1e-6
    assert json.loads((out / TRANSFER_FILE).read_text())["targets"] == summary["targets"]


def test_a_rerun_keeps_finished_sets_and_recrafts_a_foreign_one(crafted):
    cfg, out, summary, first_logs = crafted
    assert sum("crafting" in line for line in first_logs) == len(ATTACKS)
    victim = out / SET_DIR / "fgsm__eps0.3.npz"
    with np.load(victim, allow_pickle=False) as f:
        saved = {k: f[k] for k in f.files}
    np.savez(victim, **{**saved, "fingerprint": np.array("someone-else")})
    logs: list[str] = []
    again = run_transfer(cfg, out, log=logs.append)
    assert sum("kept" in line for line in logs) == len(ATTACKS) - 1
    assert [line for line in logs if "crafting" in line] == [next(l for l in first_logs if "crafting fgsm" in l)]
    assert again["targets"] == summary["targets"]
    (out / SET_DIR / "ifgsm-a__eps0.3.npz").write_bytes(b"not a zip")   # a damaged set is crafted again
    logs = []
    assert run_transfer(cfg, out, log=logs.append)["targets"] == summary["targets"]
    assert [line for line in logs if "crafting" in line] == [next(l for l in first_logs if "crafting ifgsm-a" in l)]


def test_bad_input_is_one_clear_error(mnist_runs, data_dir, tmp_path):
    native, dundi = str(mnist_runs["native"]), str(mnist_runs["dundi"])
    with pytest.raises(DundiError, match="craft on a native run"):
        run_transfer(TransferConfig(dundi, [native], attacks=["fgsm"], limit=2, data_dir=data_dir), tmp_path / "a")
    with pytest.raises(DundiError, match="at least one target"):
        run_transfer(TransferConfig(native, [], attacks=["fgsm"], limit=2, data_dir=data_dir), tmp_path / "b")
    with pytest.raises(DundiError, match="unknown attack"):
        run_transfer(TransferConfig(native, [dundi], attacks=["nope"], limit=2, data_dir=data_dir), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_command_prints_one_line_per_target(mnist_runs, data_dir, tmp_path, capsys):
    from dundi.cli.main import main

    argv = ["transfer", str(mnist_runs["native"]), "--targets", str(mnist_runs["dundi"]), "--attacks", "fgsm",
            "--limit", "8", "--out", str(tmp_path / "t"), "--data-dir", data_dir, "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["count"] == 8 and [t["kind"] for t in summary["targets"]] == ["dundi"]
    assert any(line.startswith(summary["targets"][0]["target"]) and "fgsm" in line for line in out)
    assert main(["transfer", str(mnist_runs["native"]), "--targets", str(tmp_path / "missing"), "--attacks",
                 "fgsm", "--out", str(tmp_path / "u"), "--data-dir", data_dir]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
