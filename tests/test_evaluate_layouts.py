"""The same rows in any layout: per-sample random streams, batch-invariant forward passes, and
one small evaluation run in three layouts (one process with 1 and 2 torch threads at two shard
sizes, and 2 Ray actors) whose rows are compared column by column."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from dundi.attacks import make_attack
from dundi.attacks.draws import SampleDraws, hash32
from dundi.evaluation.config import EvalConfig
from dundi.evaluation.evaluate import evaluate_local
from dundi.evaluation.results import KEY, read_results
from dundi.nets.invariant import InvariantForward


def test_hash32_is_a_bijection_on_a_window_and_uniform_enough():
    x = torch.arange(1 << 16, dtype=torch.int64) * 65_537 + 12_345  # distinct 32-bit inputs
    h = hash32(x)
    assert len(torch.unique(h)) == len(x) and int(h.min()) >= 0 and int(h.max()) < 1 << 32
    counts = torch.bincount(h >> 28, minlength=16).double()  # top 4 bits: 16 equal bins
    chi2 = float(((counts - len(x) / 16) ** 2 / (len(x) / 16)).sum())
    assert chi2 < 40, chi2  # 15 degrees of freedom: p ~ 5e-4 at 40


def test_a_samples_draws_depend_on_its_key_alone():
    keys = torch.tensor([5, 7, 9, 2 ** 40 + 3])
    whole = SampleDraws(11, keys)
    first = whole.rand((4, 3, 2))
    alone = SampleDraws(11, keys[1:2]).rand((1, 3, 2))
    assert torch.equal(first[1], alone[0])
    # a subset keeps drawing each sample's own next numbers
    nxt = whole.take(torch.tensor([3, 1])).randint(0, 10, (2, 5))
    one = SampleDraws(11, keys[1:2])
    one.rand((1, 3, 2))
    assert torch.equal(nxt[1], one.randint(0, 10, (1, 5))[0])
    assert not torch.equal(first[0], first[2])  # other keys, other numbers
    assert not torch.equal(SampleDraws(12, keys).rand((4, 3, 2)), first)  # other seed too
    u = SampleDraws(0, torch.arange(64)).rand((64, 1000))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.01
    z = SampleDraws(0, torch.arange(64)).normal((64, 1000))
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(),
                         nn.Linear(16, 10)).eval()


@pytest.mark.parametrize("native", [False, True])
def test_invariant_forward_computes_the_network_and_the_same_bits_in_any_batch(native):
    from dundi.nets.models import NativeNet

    net = _net()
    if native:  # features + a Linear head, as native runs are built
        net = NativeNet(net[:-1], 16, 10).eval()
    x = torch.rand(17, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    inv = InvariantForward(net)
    assert inv._layers is not None and len(inv._layers) == 6
    with torch.no_grad():
        full = inv(x)
        torch.testing.assert_close(full, net(x), rtol=1e-5, atol=1e-6)
        for start, size in ((0, 1), (3, 5), (9, 8), (2, 2)):
            assert torch.equal(inv(x[start:start + size]), full[start:start + size])


@pytest.mark.parametrize("name", ["pgd", "apgd", "square", "fab-t", "autoattack"])
def test_a_keyed_attack_gives_a_sample_the_same_result_in_any_batch(name):
    model = InvariantForward(_net())
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    keys = torch.tensor([101, 7, 33, 4, 59, 12])
    kw = {"n_queries": 20} if name in ("square", "autoattack") else {}
    attack = make_attack(name, model, eps=0.1, steps=5, seed=3, **kw)
    whole = attack.run(x, y, keys)
    part = attack.run(x[[4, 1]], y[[4, 1]], keys[[4, 1]])
    assert torch.equal(part.adv, whole.adv[[4, 1]]) and torch.equal(part.steps, whole.steps[[4, 1]])
    unkeyed = attack.run(x, y)  # without keys: one generator for the batch, as before
    assert unkeyed.adv.shape == x.shape


def _rows(out) -> dict[tuple, dict]:
    rows = read_results(out, require_complete=True).to_pylist()
    by_key = {tuple(r[c] for c in KEY): r for r in rows}
    assert len(by_key) == len(rows)
    return by_key


@pytest.fixture(scope="module")
def layout_cfg(mnist_runs, data_dir) -> EvalConfig:
    return EvalConfig(run=str(mnist_runs["dundi"]), native=str(mnist_runs["native"]), attacks=["pgd", "square"],
                      threats=["adaptive", "transfer"], eps=[0.1], steps=5, limit=12, shard_size=4,
                      n_values=[1, 10], save_adv=True, data_dir=data_dir)


@pytest.fixture(scope="module")
def one_thread_rows(layout_cfg, tmp_path_factory) -> dict[tuple, dict]:
    out = tmp_path_factory.mktemp("one-thread")
    evaluate_local(layout_cfg, out, progress=False, log=lambda s: None, threads=1)
    rows = _rows(out)
    assert len(rows) == 12 * 2 * 2
    # the attacks did something: not every adversarial image is its clean image
    assert np.mean([r["l0"] > 0 for r in rows.values()]) > 0.5
    return rows


def _assert_same_rows(rows: dict, ref: dict, layout: str) -> None:
    assert rows.keys() == ref.keys()
    differ = {c for k, r in ref.items() for c, v in r.items() if rows[k][c] != v}
    assert not differ, f"{layout}: columns {sorted(differ)} differ from one process, one thread, shards of 4"


@pytest.mark.realdata
def test_two_shard_threads_and_another_shard_size_give_the_same_rows(layout_cfg, one_thread_rows, tmp_path):
    """Shards of 6 run two at a time in one process against shards of 4 one at a time: every
    column of every row identical -- random starts (PGD) and proposals (Square), the saved
    adversarial images, labels, distances, gradient norms."""
    out = tmp_path / "two-threads"
    timing = evaluate_local(dataclasses.replace(layout_cfg, shard_size=6), out, progress=False,
                            log=lambda s: None, threads=2)
    assert timing["threads"] == 2
    _assert_same_rows(_rows(out), one_thread_rows, "2 shard threads, shards of 6")


@pytest.mark.ray
@pytest.mark.realdata
def test_ray_actors_give_the_same_rows(layout_cfg, one_thread_rows, ray_local, tmp_path):
    from dundi.distributed.evaluate_job import evaluate_on_ray

    evaluate_on_ray(layout_cfg, tmp_path / "ray", workers=2, progress=False, log=lambda s: None)
    _assert_same_rows(_rows(tmp_path / "ray"), one_thread_rows, "2 Ray actors")


def test_the_layout_follows_the_measured_use_of_the_cores():
    from dundi.distributed.evaluate_job import choose_layout

    busy = {"seconds": 10.0, "cpu_seconds": 19.0, "threads": 2, "shards_run": 2}
    held = {"seconds": 10.0, "cpu_seconds": 11.0, "threads": 2, "shards_run": 2}
    assert choose_layout(busy, 2, 100)[0] == "local"           # threads kept both cores busy
    layout, why = choose_layout(held, 2, 100)
    assert layout == "ray" and "1.10 of 2 cores" in why        # held back: the actors take the rest
    assert choose_layout(held, 2, 3)[0] == "local"              # too little left for Ray's start-up
    assert choose_layout({**held, "threads": 1}, 1, 100)[0] == "local"  # one core: nothing to gain
    # shards of a tenth of a second, held back by the GIL: Ray's start-up could never pay
    tiny = {"seconds": 0.15, "cpu_seconds": 0.2, "threads": 2, "shards_run": 2}
    assert choose_layout(tiny, 2, 14)[0] == "local"


def test_more_workers_than_the_clusters_cpus_are_refused_in_one_line():
    from dundi.distributed.evaluate_job import check_worker_count
    from dundi.errors import DundiError

    with pytest.raises(DundiError, match=r"--workers 5 .* 2 CPU\(s\): use --workers 2 or fewer"):
        check_worker_count(5, {"CPU": 2.0}, started_here=False)
    check_worker_count(2, {"CPU": 2.0}, started_here=False)
    check_worker_count(5, {"CPU": 5.0}, started_here=True)  # a local Ray started with 5 CPUs


@pytest.mark.ray
@pytest.mark.realdata
def test_ray_with_more_workers_than_cpus_answers_instead_of_hanging(layout_cfg, ray_local, tmp_path):
    from dundi.distributed.evaluate_job import evaluate_on_ray
    from dundi.errors import DundiError

    with pytest.raises(DundiError, match="--workers 3"):
        evaluate_on_ray(layout_cfg, tmp_path / "ray", workers=3, progress=False, log=lambda s: None)
