"""The whole-split evaluation job: Ray workers that really run side by side, a run killed
mid-way that resumes with every row exactly once, and a summary that states its sample, its
95% interval and its cost."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dundi.evaluation.config import EvalConfig
from dundi.evaluation.evaluate import evaluate_local, prepare
from dundi.evaluation.results import KEY, TIMING_FILE, finished_shards, read_results, wilson_interval
from dundi.evaluation.summary import sample as results_sample
from dundi.evaluation.summary import summarize

DEADLINE_S = 300


def rows_by_key(table) -> dict[tuple, dict]:
    rows = table.to_pylist()
    out = {tuple(r[c] for c in KEY): r for r in rows}
    assert len(out) == len(rows), "a key appears twice"
    return out


@pytest.fixture(scope="module")
def slow_cfg(mnist_runs, data_dir) -> EvalConfig:
    """Shards that take a noticeable time each (PGD-40 on the exact two-step stand-in)."""
    return EvalConfig(run=str(mnist_runs["dundi"]), native=str(mnist_runs["native"]), attacks=["pgd"],
                      threats=["adaptive"], eps=[0.1], steps=40, limit=48, shard_size=8,
                      n_values=[1, 10], data_dir=data_dir)


def test_busy_overlap_agrees_with_a_brute_force_count():
    from dundi.distributed.evaluate_job import busy_overlap

    rng = np.random.default_rng(0)
    for _ in range(20):
        starts = rng.uniform(0, 10, 6)
        tasks = [{"start": s, "end": s + d} for s, d in zip(starts, rng.uniform(0.1, 4, 6))]
        grid = np.linspace(0, 15, 150_001)
        busy = sum(((grid >= t["start"]) & (grid < t["end"])).astype(int) for t in tasks)
        brute = (busy >= 2).sum() * (grid[1] - grid[0])
        assert busy_overlap(tasks) == pytest.approx(brute, abs=2e-3)
    assert busy_overlap([{"start": 0, "end": 1}, {"start": 1, "end": 2}]) == 0.0  # back to back


@pytest.mark.ray
def test_the_dispatcher_has_every_actor_inside_a_shard_at_once(ray_local):
    """Real Ray actors that, inside a shard, wait for every other actor to be inside one too:
    they all meet only if the dispatcher hands shards to all of them at once. Fails (the
    deadline, in the actor) when the shards go out one after the other, whatever the speed."""
    import ray

    from dundi.distributed.evaluate_job import _dispatch

    @ray.remote(num_cpus=0)
    class Meeting:
        def __init__(self):
            self.inside = set()

        def arrive(self, worker: int) -> int:
            self.inside.add(worker)
            return len(self.inside)

    @ray.remote(num_cpus=0)
    class MeetingWorker:
        def __init__(self, worker: int, meeting, expected: int):
            self.worker, self.meeting, self.expected = worker, meeting, expected

        def evaluate(self, spec: dict):
            deadline = time.monotonic() + 60
            while ray.get(self.meeting.arrive.remote(self.worker)) < self.expected:
                assert time.monotonic() < deadline, f"worker {self.worker} met no other worker in 60 s"
                time.sleep(0.01)
            return spec["name"], None, {"worker": self.worker}

    @dataclasses.dataclass
    class Spec:
        name: str

    meeting = Meeting.remote()
    actors = [MeetingWorker.remote(i, meeting, 2) for i in range(2)]
    results = []
    _dispatch(actors, [Spec(f"s{i}") for i in range(6)], lambda name, _, info: results.append((name, info["worker"])))
    assert sorted(name for name, _ in results) == [f"s{i}" for i in range(6)]
    assert {worker for _, worker in results} == {0, 1}


@pytest.mark.ray
@pytest.mark.realdata
def test_ray_workers_share_the_shards_and_give_the_local_rows(slow_cfg, ray_local, tmp_path):
    """Two ShardWorker actors on two CPUs both evaluate shards (that they do so at once is the
    dispatcher's test above), and their rows are one process's rows."""
    from dundi.distributed.evaluate_job import evaluate_on_ray

    timing = evaluate_on_ray(slow_cfg, tmp_path / "ray", workers=2, progress=False, log=lambda s: None)
    tasks = timing["tasks"]
    workers = {t["worker"] for t in tasks}
    assert len(tasks) == 6 and len(workers) == 2, f"shards ran on {len(workers)} worker(s): {tasks}"
    if os.geteuid() == 0:  # lowering Ray's worker niceness (15) back to the driver's needs privilege
        assert {t["niceness"] for t in tasks} == {os.getpriority(os.PRIO_PROCESS, 0)}

    evaluate_local(slow_cfg, tmp_path / "local", progress=False, log=lambda s: None)
    assert rows_by_key(read_results(tmp_path / "ray")) == rows_by_key(read_results(tmp_path / "local"))


EVALUATE_ON_TWO_NODES = """
from dundi.distributed.evaluate_job import evaluate_on_ray
from dundi.evaluation.config import EvalConfig

timing = evaluate_on_ray(EvalConfig(**json.loads(sys.argv[1])), sys.argv[2], address=cluster.address,
                         progress=False, log=lambda s: None)
result = {k: timing[k] for k in ("node_count", "workers", "shards_run")}
"""


@pytest.mark.ray
@pytest.mark.realdata
def test_a_two_node_cluster_gives_the_local_rows(slow_cfg, tmp_path):
    """A real 2-node cluster (ray.cluster_utils.Cluster, one CPU per node, in a subprocess so
    it does not meet the session's local Ray), reached by its address: one actor per node,
    and the rows those two nodes write are the rows one process writes."""
    cfg = dataclasses.replace(slow_cfg, steps=10, limit=16)
    from two_node import on_two_nodes

    out = tmp_path / "two-node"
    facts = on_two_nodes(EVALUATE_ON_TWO_NODES, json.dumps(dataclasses.asdict(cfg)), str(out), timeout=DEADLINE_S)
    assert facts == {"node_count": 2, "workers": 2, "shards_run": 2}, facts
    evaluate_local(cfg, tmp_path / "local", progress=False, log=lambda s: None)
    assert rows_by_key(read_results(out)) == rows_by_key(read_results(tmp_path / "local"))


def _cli(cfg: EvalConfig, out: Path) -> list[str]:
    return [sys.executable, "-m", "dundi.cli.main", "evaluate", cfg.run, "--native", cfg.native,
            "--attacks", *cfg.attacks, "--threat", *cfg.threats, "--eps", *map(str, cfg.eps),
            "--steps", str(cfg.steps), "--limit", str(cfg.limit), "--shard-size", str(cfg.shard_size),
            "--n-values", *map(str, cfg.n_values), "--workers", "0", "--data-dir", cfg.data_dir,
            "--out", str(out)]


@pytest.mark.realdata
def test_the_command_on_ray_workers_finishes_with_the_local_rows(slow_cfg, tmp_path):
    """`dundi evaluate --workers 2` as a user runs it: its own process starting a local Ray
    (the in-process tests start Ray first). A Ray started from a thread once ended this
    process with exit status 1 and no message as soon as shards ran."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("RAY_ADDRESS", None)
    cmd = [*_cli(slow_cfg, tmp_path / "ray")]
    cmd[cmd.index("--workers") + 1] = "2"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE_S * 4)
    assert done.returncode == 0, done.stderr[-600:]
    evaluate_local(slow_cfg, tmp_path / "local", progress=False, log=lambda s: None)
    assert rows_by_key(read_results(tmp_path / "ray", require_complete=True)) == \
        rows_by_key(read_results(tmp_path / "local"))


@pytest.mark.realdata
def test_killed_evaluation_resumes_with_every_row_exactly_once(slow_cfg, tmp_path):
    """SIGKILL the evaluating process after its first shard, rerun the same command: the
    result has every (sample, attack, eps, threat) once, equal to an uninterrupted run's."""
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(_cli(slow_cfg, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + DEADLINE_S
    while not finished_shards(out) and proc.poll() is None:
        assert time.monotonic() < deadline, f"no shard written within {DEADLINE_S} s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {proc.stderr.read()[-400:]}"
    done_at_kill = len(finished_shards(out))
    assert 1 <= done_at_kill < 6, f"{done_at_kill} shards were written when killed: no resume to test"

    timing = evaluate_local(slow_cfg, out, progress=False, log=lambda s: None)
    assert timing["shards_skipped"] == done_at_kill and timing["shards_run"] == 6 - done_at_kill
    resumed = rows_by_key(read_results(out, require_complete=True))
    evaluate_local(slow_cfg, tmp_path / "whole", progress=False, log=lambda s: None)
    assert resumed == rows_by_key(read_results(tmp_path / "whole"))
    _, plan, _ = prepare(slow_cfg, out)
    assert len(resumed) == sum(s.stop - s.start for s in plan) == 48


@pytest.mark.realdata
def test_summary_states_sample_interval_and_cost(mnist_runs, data_dir, tmp_path):
    cfg = EvalConfig(run=str(mnist_runs["dundi"]), native=str(mnist_runs["native"]), attacks=["fgsm"],
                     threats=["adaptive"], eps=[0.1], limit=24, shard_size=8, n_values=[1], data_dir=data_dir)
    first = evaluate_local(cfg, tmp_path, progress=False, max_shards=1, log=lambda s: None)
    second = evaluate_local(cfg, tmp_path, progress=False, log=lambda s: None)
    summary = summarize(tmp_path)

    sample = summary["sample"]
    assert (sample["samples"], sample["selection"], sample["split"]) == (24, "seeded random choice", "test")
    assert sample["split_size"] > 24

    calls = [json.loads(line) for line in (tmp_path / TIMING_FILE).read_text().splitlines()]
    assert [c["rows"] for c in calls] == [8, 16]  # each call's own image-attacks
    cost = summary["cost"]
    wall = first["seconds"] + second["seconds"]
    assert cost["image_attacks"] == 24 and cost["seconds"] == pytest.approx(wall, abs=1e-3)
    assert cost["image_attacks_per_second"] == pytest.approx(24 / wall, rel=1e-3)
    assert cost["core_seconds_per_1000"] == pytest.approx(1000 * wall * 1 / 24, rel=1e-3)  # one thread

    row = summary["attacks"][0]
    lo, hi = row["robust_accuracy_ci95"]
    robust = round(row["robust_accuracy"] * row["count"])
    # the Wilson interval is the set of p whose score test does not reject the observed rate
    grid = np.linspace(0, 1, 200_001)
    accepted = grid[np.abs(robust / row["count"] - grid) <= 1.959964 * np.sqrt(grid * (1 - grid) / row["count"])]
    assert (lo, hi) == pytest.approx((accepted.min(), accepted.max()), abs=1e-4)
    worst = summary["worst_case"][0]
    assert worst["robust_accuracy_ci95"][0] <= worst["robust_accuracy"] <= worst["robust_accuracy_ci95"][1]

    whole, plan, _ = prepare(dataclasses.replace(cfg, limit=None), tmp_path / "whole")  # --limit all
    assert whole["samples"] == whole["split_size"] == sum(s.stop - s.start for s in plan)
    assert results_sample(whole)["selection"] == "whole split"


def test_wilson_interval_edges():
    lo, hi = wilson_interval(32, 32)
    assert hi == 1.0 and 0.88 < lo < 0.9  # all robust on 32 samples is not "exactly 100%"
    assert wilson_interval(0, 10)[0] == 0.0
    assert all(np.isnan(wilson_interval(0, 0)))


def test_limit_takes_all_or_a_positive_count():
    from dundi.cli.evaluate_cmds import limit_arg

    assert limit_arg("all") is None and limit_arg("ALL") is None and limit_arg("300") == 300
    for bad in ("0", "-3", "some"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive number of samples or 'all'"):
            limit_arg(bad)
