"""The rule as certified runs serve it (dundi.rule.exact) and the float32-aware bounds that
prove it, checked against independent computations: the literal float64 Algorithm 1,
correctly rounded sums, the FAISS path of the index, and the float32 network itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import dundi.rule.exact as exact_rule
from dundi.errors import DundiError
from dundi.nets.bounds import input_box, propagate, propagate_served, served_layers
from dundi.rule.exact import ExactRule, fixed_sum, invariant_linear
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.rule.reference import two_step_reference
from rule_helpers import resolved


def test_fixed_sum_is_independent_of_the_other_rows_and_close_to_the_exact_sum():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 37)) * np.exp(rng.uniform(-20, 20, (300, 37)))
    whole = fixed_sum(rows)
    for size in (1, 2, 5, 64, 300):
        part = np.concatenate([fixed_sum(rows[i:i + size]) for i in range(0, 300, size)])
        assert np.array_equal(part, whole)
    for row, got in zip(rows, whole):
        exact = math.fsum(row.tolist())
        assert abs(got - exact) <= exact_rule.gamma(37, exact_rule.U64) * np.abs(row).sum()


@pytest.mark.parametrize("n,m,k", [(5, 2, 2), (4, 4, 3), (6, 1, 1), (3, 3, 7)])
def test_exact_rule_is_algorithm_1_on_tie_heavy_data(n, m, k):
    """Classes that are exact copies of each other (ties in both steps) and queries on a
    coarse grid: the exact rule answers what the literal float64 reference answers."""
    rng = np.random.default_rng(n * 10 + k)
    base = rng.integers(-3, 4, (4, n, 3)).astype(np.float32)
    oracles = np.concatenate([base, base[::-1], base[:1]])            # 9 classes, many copies
    queries = rng.integers(-3, 4, (200, 3)).astype(np.float32)
    rule = resolved(oracles, TwoStepRule(n, m, k), "sqeuclidean")
    got = ExactRule(oracles, rule).classify(queries)
    ref = two_step_reference(torch.from_numpy(queries), torch.from_numpy(oracles), rule)
    assert np.array_equal(got.labels, ref.numpy())


def test_the_index_answers_through_the_exact_rule_and_agrees_with_faiss_off_ties():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((12 * 8, 16)).astype(np.float32)
    index = OracleIndex(vectors, 12, metric="sqeuclidean")
    q = rng.standard_normal((400, 16)).astype(np.float32)
    got = index.classify(q, TwoStepRule(8, 3, 4))
    assert index.step1_kind(index.resolve(TwoStepRule(8, 3))) == "exact (float64)"
    faiss_path = OracleIndex(vectors, 12, metric="sqeuclidean")
    faiss_path.answers_exactly = lambda n: False   # the float32 FAISS path, for comparison
    other = faiss_path.classify(q, TwoStepRule(8, 3, 4))
    assert (got.labels == other.labels).mean() > 0.99
    np.testing.assert_allclose(got.fine_scores, other.fine_scores, rtol=1e-4)
    np.testing.assert_allclose(got.nearest_distance, other.nearest_distance, rtol=1e-4)


def test_many_classes_take_the_bounded_blas_path_to_the_same_answer(monkeypatch):
    rng = np.random.default_rng(2)
    centre = rng.standard_normal(8)
    oracles = (centre + 1e-3 * rng.standard_normal((300, 4, 8))).astype(np.float32)  # near-ties
    queries = (centre + rng.standard_normal((50, 8))).astype(np.float32)
    rule = resolved(oracles, TwoStepRule(4, 2, 5), "sqeuclidean")
    direct = ExactRule(oracles, rule).classify(queries)
    monkeypatch.setattr(exact_rule, "EXACT_CLASSES", 10)
    listed = ExactRule(oracles, rule).classify(queries)
    for field in ("labels", "topk_classes", "coarse_scores", "fine_scores"):
        assert np.array_equal(getattr(direct, field), getattr(listed, field)), field


def test_invariant_linear_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    w, b = torch.randn(64, 300), torch.randn(64)
    x = torch.randn(120, 300)
    alone = torch.cat([invariant_linear(x[i:i + 1], w, b) for i in range(len(x))])
    for size in (2, 3, 16, 17, 120):
        assert torch.equal(torch.cat([invariant_linear(x[i:i + size], w, b) for i in range(0, 120, size)]), alone)
    torch.testing.assert_close(alone, x @ w.T + b, rtol=1e-5, atol=1e-4)


def _net(padding_mode: str = "zeros") -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode=padding_mode), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def test_served_bounds_contain_what_the_float32_network_computes_in_any_batch():
    """The float32 network at random points and corners of the ball, in batches of several
    sizes, stays inside the float32-aware box; the box is not much wider than the exact one."""
    net = _net()
    bn = net[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    x = torch.rand(6, 1, 8, 8)
    lo, hi = propagate_served(served_layers(list(net)), *input_box(x.double(), 0.05))
    exact_lo, exact_hi = propagate([layer.double() for layer in _copy(net)], *input_box(x.double(), 0.05))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(len(x)):
            u = torch.rand((200, 1, 8, 8), generator=g)
            u[:100] = (u[:100] > 0.5).float()
            a, b = input_box(x[i:i + 1], 0.05)
            pts = a + u * (b - a)
            for size in (1, 7, 200):
                out = torch.cat([net(pts[j:j + size]) for j in range(0, 200, size)])
                assert (out >= lo[i]).all() and (out <= hi[i]).all()
    assert ((hi - lo) <= (exact_hi - exact_lo) * 1.01 + 1e-4).all()


def _copy(net: nn.Sequential) -> list[nn.Module]:
    import copy

    return list(copy.deepcopy(net))


def test_bounds_refuse_non_zero_padding():
    net = _net("reflect")
    with pytest.raises(DundiError, match="zero padding"):
        served_layers(list(net))
    with pytest.raises(DundiError, match="zero padding"):
        propagate(list(net), torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8))
