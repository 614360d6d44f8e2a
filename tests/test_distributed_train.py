"""Ray Train: DDP training on a real local Ray (2 CPUs) and real mnist-10k data, checkpoints,
resume by name, recovery from a killed worker, a 2-node cluster, and equality with the local
loop. Each Ray Train fit costs ~20-40 s on a 2-core machine, so the runs are small (the full
8,000-image training split, a few thousand tuples, 1-3 epochs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dundi.errors import DundiError
from dundi.training.config import TrainConfig

pytestmark = [pytest.mark.ray, pytest.mark.realdata, pytest.mark.slow]

# the abstain rule's shape basis comes with the first index (dundi.run.shape_fit)
RUN_FILES = {"metrics.json", "model.safetensors", "run.json", "oracle/v1/index.faiss", "oracle/v1/oracle.json",
             "shape_basis.npz"}


def small_cfg(**kw) -> TrainConfig:
    base = dict(dataset="mnist-10k", arch="lenet5", epochs=2, tuples=4000, batch_size=128, seed=0)
    return TrainConfig(**{**base, **kw})


def files_of(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def history(run: Path) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())


def options(data_dir, **kw):
    from dundi.distributed.train_job import RayOptions

    return RayOptions(**{"oracles": 10, "data_dir": data_dir, "progress": False, **kw})


def test_two_workers_converge_write_a_run_and_resume_by_name(ray_local, tmp_path, data_dir):
    from dundi.distributed.train_job import run_ray_training
    from dundi.run.directory import Run
    from dundi.run.pipeline import classify_split

    out = tmp_path / "two"
    meta = run_ray_training("dundi", small_cfg(), out, options(data_dir, workers=2))
    assert files_of(out) == RUN_FILES
    h = history(out)
    assert [e["epoch"] for e in h] == [0, 1]
    assert h[1]["loss"] < h[0]["loss"] < 0.5, h
    assert h[1]["ordered"] > 0.8 and h[1]["val_accuracy"] > 0.4, h  # 10 classes: chance is 0.1
    ray_facts = meta["ray"]
    assert ray_facts["workers"] == 2 and ray_facts["starts"] == [0]
    assert [n["rows"] for n in ray_facts["nodes"]] == [4000, 4000]  # each worker its own half
    assert ray_facts["storage"] == str((tmp_path / "ray_storage").resolve())  # next to, not in, the run
    run = Run.load(out)
    assert run.oracle is not None and run.oracle.n == 10
    assert classify_split(out, data_dir=data_dir, limit=500)["accuracy"] > 0.4

    # Same name (the run directory's name), more epochs: only the new epoch is trained.
    meta = run_ray_training("dundi", small_cfg(epochs=3), out, options(data_dir, workers=2))
    assert meta["ray"]["starts"] == [0, 2]
    h3 = history(out)
    assert [e["epoch"] for e in h3] == [0, 1, 2] and h3[:2] == h
    assert h3[2]["loss"] < h[1]["loss"]
    assert Run.load(out).oracle is not None


@pytest.mark.parametrize("extra", [{"tuples": 3000},
                                   {"tuples": 600, "adversarial": True, "adv_steps": 2, "adv_warmup": 2},
                                   {"arch": "cnn-ibp", "certified": True, "metric": "sqeuclidean",
                                    "cert_eps": 0.1, "cert_warmup": 0.5, "cert_ramp": 1.0,
                                    "cert_per_class": 10, "limit": 2000}],
                         ids=["plain", "dundi-at", "certified"])
def test_one_worker_gives_the_local_loop_s_loss_curve(ray_local, tmp_path, data_dir, extra):
    """Same seed → same rows, tuples, order, initial weights and PGD starts; the worker runs on
    one CPU thread, so the local loop does too (thread count changes float summation order).
    DunDi-AT (adversarial anchors, budget warm-up) and certified training (class-balanced
    batches, interval bounds, eps schedule) go through the same epoch code."""
    from dundi.distributed.train_job import run_ray_training
    from dundi.run.storage import load_model, read_meta
    from dundi.run.pipeline import build_index, train_dundi_run

    cfg = small_cfg(**extra)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_dundi_run(cfg, tmp_path / "local", None, data_dir, progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    build_index(tmp_path / "local", n=10, seed=cfg.seed, data_dir=data_dir)
    run_ray_training("dundi", small_cfg(**extra), tmp_path / "ray1", options(data_dir, workers=1))

    local, ray1 = history(tmp_path / "local"), history(tmp_path / "ray1")
    assert [sorted(e) for e in local] == [sorted(e) for e in ray1]
    for a, b in zip(local, ray1):
        for key in {"loss", "ordered", "batch_certified", "val_accuracy"} & set(a):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)
    # The run directories are interchangeable: same files, same metadata fields, same weights.
    assert files_of(tmp_path / "local") == files_of(tmp_path / "ray1") == RUN_FILES
    meta_l, meta_r = read_meta(tmp_path / "local"), read_meta(tmp_path / "ray1")
    assert set(meta_r) - set(meta_l) == {"ray"} and set(meta_l) <= set(meta_r)
    assert meta_r["config"] == meta_l["config"] and meta_r["mode"] == meta_l["mode"] == "R"
    wl, wr = load_model(tmp_path / "local")[0].state_dict(), load_model(tmp_path / "ray1")[0].state_dict()
    for name in wl:
        torch.testing.assert_close(wr[name], wl[name], rtol=1e-3, atol=1e-4)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def test_a_killed_worker_costs_at_most_the_epoch_in_progress(ray_local, tmp_path, data_dir):
    """A worker process gets SIGKILL right after epoch 0's checkpoint is registered (a Ray Train
    callback on the controller does it, on the event itself: no polling of Ray's files); the run
    restarts both workers from that checkpoint and finishes with every epoch recorded once."""
    import ray.train

    from dundi.distributed.train_job import run_ray_training

    class KillRankOneAfterFirstCheckpoint(ray.train.UserCallback):  # local: pickled by value
        def __init__(self, record: Path) -> None:
            self.record = record  # the victim's pid, for the test to check (same machine)

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if not self.record.exists() and checkpoint is not None:
                with checkpoint.as_directory() as d:
                    victim = json.loads((Path(d) / "state.json").read_text())["nodes"][1]["pid"]
                self.record.write_text(str(victim))
                os.kill(victim, signal.SIGKILL)  # rank 1 dies as epoch 1 begins

    out = tmp_path / "killed"
    record = tmp_path / "victim.pid"
    opts = options(data_dir, workers=2, max_failures=2, callbacks=(KillRankOneAfterFirstCheckpoint(record),))
    meta = run_ray_training("dundi", small_cfg(epochs=3, tuples=6000), out, opts)
    starts = meta["ray"]["starts"]
    # Two attempts; the second resumed right after epoch 0's checkpoint.
    assert len(starts) == 2 and starts[0] == 0 and starts[1] == 1, starts
    assert [e["epoch"] for e in history(out)] == [0, 1, 2]
    victim = int(record.read_text())
    assert not _alive(victim) and victim not in [n["pid"] for n in meta["ray"]["nodes"]]


TRAIN_ON_TWO_NODES = """
from dundi.distributed.ray_init import init_ray
from dundi.distributed.train_job import RayOptions, run_ray_training
from dundi.training.config import TrainConfig

init_ray(cluster.address, log_to_driver=False)
cfg = TrainConfig("mnist-10k", "lenet5", epochs=1, tuples=3000)
meta = run_ray_training("dundi", cfg, sys.argv[1], RayOptions(
    workers=2, address=cluster.address, oracles=10, data_dir=sys.argv[2] or None, progress=False))
result = meta["ray"]
"""


def test_two_node_cluster(tmp_path, data_dir):
    """A real 2-node cluster (ray.cluster_utils.Cluster, one CPU per node), in a subprocess so
    it does not meet the session's local Ray."""
    from two_node import on_two_nodes

    from dundi.run.directory import Run

    out = tmp_path / "twonode"
    facts = on_two_nodes(TRAIN_ON_TWO_NODES, str(out), data_dir)
    assert facts["workers"] == 2
    assert len({n["node"] for n in facts["nodes"]}) == 2, facts["nodes"]  # one worker per node
    run = Run.load(out)
    assert run.meta["kind"] == "dundi" and run.oracle is not None


def test_train_native_cli_on_two_workers(ray_local, tmp_path, data_dir, capsys):
    from dundi.cli.main import main
    from dundi.run.directory import Run

    out = tmp_path / "native"
    code = main(["train-native", "--workers", "2", "--epochs", "1", "--out", str(out), "--json",
                 "--no-progress", "--data-dir", data_dir])
    assert code == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["test_accuracy"] > 0.7, figures
    run = Run.load(out)
    assert run.meta["kind"] == "native" and run.meta["ray"]["workers"] == 2
    assert set(history(out)[0]) == {"epoch", "loss", "train_accuracy", "val_accuracy"}


# ----------------------------------------------------------------------------- bad input


def test_bad_input_fails_fast_with_a_message(tmp_path, data_dir):
    from dundi.distributed.ray_init import check_reachable
    from dundi.distributed.train_job import resolve_storage, run_ray_training

    t0 = time.monotonic()
    with pytest.raises(DundiError, match="cannot reach a Ray cluster at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1")
    with pytest.raises(DundiError, match="not host:port"):
        check_reachable("http://")
    with pytest.raises(DundiError, match="not a filesystem pyarrow can open"):
        resolve_storage("nosuchscheme://bucket/x", tmp_path / "run")
    with pytest.raises(DundiError, match="unknown dataset"):
        run_ray_training("dundi", small_cfg(dataset="nope"), tmp_path / "r", options(data_dir))
    with pytest.raises(DundiError, match="--workers must be at least 1"):
        run_ray_training("dundi", small_cfg(), tmp_path / "r", options(data_dir, workers=0))
    with pytest.raises(DundiError, match="--name"):
        run_ray_training("dundi", small_cfg(), tmp_path / "r", options(data_dir, name="../up"))
    assert time.monotonic() - t0 < 30


def test_a_run_name_refuses_a_different_experiment(tmp_path):
    """The one resume rule (dundi.training.loop.resume_conflicts) guards a Ray run name: any
    changed setting -- the worker count included -- is refused, naming the change; epochs may
    change except for certified training, whose learning-rate schedule is placed by them."""
    import dataclasses

    from dundi.distributed.train_job import _check_descriptor
    from dundi.training.loop import resume_state

    storage = str(tmp_path)
    desc = resume_state("dundi", small_cfg(), 2)
    assert _check_descriptor(storage, "exp", desc) is None
    assert _check_descriptor(storage, "exp", resume_state("dundi", small_cfg(), 2)) is not None  # resumable
    with pytest.raises(DundiError, match=r"other settings \(lr 0.001 -> 0.5\)"):
        _check_descriptor(storage, "exp", resume_state("dundi", small_cfg(lr=0.5), 2))
    assert _check_descriptor(storage, "exp", resume_state("dundi", small_cfg(epochs=9), 2)) is not None
    cert = small_cfg(arch="cnn-ibp", certified=True, metric="sqeuclidean")
    assert _check_descriptor(storage, "cert", resume_state("dundi", cert, 2)) is None
    with pytest.raises(DundiError, match=r"epochs 2 -> 9"):
        _check_descriptor(storage, "cert", resume_state("dundi", dataclasses.replace(cert, epochs=9), 2))
    with pytest.raises(DundiError, match=r"workers 2 -> 1"):
        _check_descriptor(storage, "exp", resume_state("dundi", small_cfg(), 1))
    with pytest.raises(DundiError, match="kind"):
        _check_descriptor(storage, "exp", resume_state("native", small_cfg(), 2))


def test_cli_with_an_unreachable_address_exits_with_a_message(tmp_path, data_dir):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dundi", "train", "--workers", "1", "--address",
                           "127.0.0.1:1", "--epochs", "1", "--out", str(tmp_path / "r"),
                           "--data-dir", data_dir], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in proc.stderr
    assert time.monotonic() - t0 < 120


def test_checkpoints_round_trip_optimizer_and_rng_state(tmp_path):
    from dundi.nets.models import build_distance_net
    from dundi.training.checkpoint import read_checkpoint, write_checkpoint

    torch.manual_seed(0)
    model = build_distance_net("lenet1", (1, 28, 28), 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(4, 1, 28, 28)).sum().backward()
    opt.step()
    write_checkpoint(tmp_path, model, opt, {"epoch": 3, "history": [{"loss": 0.5}]})
    state, weights, opt_state, rng = read_checkpoint(tmp_path)
    assert state["epoch"] == 3 and state["history"] == [{"loss": 0.5}]
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    fresh.load_state_dict(opt_state)
    for (a, b) in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        for key in a:
            torch.testing.assert_close(torch.as_tensor(a[key]), torch.as_tensor(b[key]))
    assert torch.equal(rng["torch"], torch.get_rng_state())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    (tmp_path / "state.json").unlink()
    with pytest.raises(DundiError, match="incomplete"):
        read_checkpoint(tmp_path)


def test_worker_rows_partition_the_data(data_dir):
    from dundi.data import load_split
    from dundi.distributed.train_job import worker_rows

    _, labels, ids = load_split("mnist-10k", "train", data_dir)
    parts = [worker_rows("mnist-10k", data_dir, None, r, 2) for r in range(2)]
    got = np.sort(np.concatenate([p[2] for p in parts]))
    assert np.array_equal(got, np.sort(ids))  # disjoint and complete
    for _, y, _ in parts:  # every class on every worker, whatever order the rows are stored in
        assert len(np.unique(y)) == 10
    one = worker_rows("mnist-10k", data_dir, 1000, 0, 1)
    assert np.array_equal(one[2], ids[:1000])
