"""The FAISS two-step classifier against an independent brute-force torch Algorithm 1."""

import numpy as np
import pytest
import torch

from dundi.errors import DundiError
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.rule.reference import class_scores, two_step_reference
from rule_helpers import resolved


@pytest.mark.parametrize("C,n,m,k,dim", [
    (10, 20, 3, 5, 16), (10, 1, 1, 1, 8), (10, 1, 1, 10, 8), (10, 20, 20, 10, 16),
    (7, 5, 2, 3, 4), (50, 10, 3, 5, 32), (3, 4, 4, 1, 2), (12, 6, 1, 12, 5),
])
def test_two_step_equals_bruteforce_reference(C, n, m, k, dim):
    rng = np.random.default_rng(C * 100 + n + m + k)
    oracles = rng.normal(size=(C, n, dim)).astype(np.float32)
    queries = rng.normal(size=(200, dim)).astype(np.float32)
    index = OracleIndex(oracles.reshape(-1, dim), C)
    got = index.classify(queries, TwoStepRule(n, m, k))
    ref = two_step_reference(torch.from_numpy(queries), torch.from_numpy(oracles), index.resolve(TwoStepRule(n, m, k))).numpy()
    np.testing.assert_array_equal(got.labels, ref)
    assert got.topk_classes.shape == (200, k)
    # the label is always one of the classes kept by step 1
    assert (got.topk_classes == got.labels[:, None]).any(1).all()


@pytest.mark.parametrize("n,m,k", [(4, 2, 2), (4, 1, 3), (1, 1, 1), (4, 4, 6)])
def test_ties_break_identically(n, m, k):
    """Integer-valued vectors make distances exact in every implementation; duplicated
    classes and queries equidistant from several classes create exact ties."""
    rng = np.random.default_rng(n * 10 + m + k)
    base = rng.integers(-2, 3, size=(3, n, 4)).astype(np.float32)
    oracles = np.concatenate([base, base], 0)  # classes 3..5 duplicate 0..2: every score ties
    queries = rng.integers(-2, 3, size=(100, 4)).astype(np.float32)
    index = OracleIndex(oracles.reshape(-1, 4), 6)
    got = index.classify(queries, TwoStepRule(n, m, k)).labels
    ref = two_step_reference(torch.from_numpy(queries), torch.from_numpy(oracles), index.resolve(TwoStepRule(n, m, k))).numpy()
    np.testing.assert_array_equal(got, ref)
    assert (got < 3).all(), "a tie between a class and its duplicate goes to the lower index"


def test_differentiable_scores_argmax_equals_two_step_when_k_is_all_classes():
    rng = np.random.default_rng(1)
    oracles = rng.normal(size=(10, 20, 16)).astype(np.float32)
    queries = rng.normal(size=(300, 16)).astype(np.float32)
    index = OracleIndex(oracles.reshape(-1, 16), 10)
    two_step = index.classify(queries, TwoStepRule(20, 3, 10)).labels
    scores = class_scores(torch.from_numpy(queries), torch.from_numpy(oracles))
    np.testing.assert_array_equal(scores.argmax(1).numpy(), two_step)
    # and the fine scores the index reports are the same per-class sums
    fine = np.take_along_axis(scores.double().numpy(), index.classify(queries, TwoStepRule(k=10)).topk_classes, 1)
    np.testing.assert_allclose(index.classify(queries, TwoStepRule(k=10)).fine_scores, fine, rtol=1e-5)


def test_class_scores_carry_gradients():
    x = torch.randn(4, 8, requires_grad=True)
    class_scores(x, torch.randn(3, 5, 8)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_approximate_coarse_step_agrees_with_exact_on_clustered_classes():
    rng = np.random.default_rng(2)
    C, n, dim = 3000, 20, 32
    centers = rng.normal(size=(C, 1, dim))
    oracles = (centers + 0.3 * rng.normal(size=(C, n, dim))).astype(np.float32)
    which = rng.integers(C, size=400)
    queries = (centers[which, 0] + 0.3 * rng.normal(size=(400, dim))).astype(np.float32)
    approx = OracleIndex(oracles.reshape(-1, dim), C, exact_coarse_limit=0).classify(queries)
    exact = class_scores(torch.from_numpy(queries), torch.from_numpy(oracles)).argmax(1).numpy()
    assert (approx.labels == exact).mean() >= 0.99
    assert (approx.labels == which).mean() >= 0.99


def test_nearest_distance_is_the_minimum_over_kept_oracles():
    rng = np.random.default_rng(3)
    oracles = rng.normal(size=(5, 4, 6)).astype(np.float32)
    q = rng.normal(size=(20, 6)).astype(np.float32)
    res = OracleIndex(oracles.reshape(-1, 6), 5).classify(q, TwoStepRule(4, 2, 5))
    brute = np.linalg.norm(q[:, None, None, :] - oracles[None], axis=-1).min(axis=(1, 2))
    np.testing.assert_allclose(res.nearest_distance, brute, rtol=1e-5)


def test_bad_parameters_are_refused_with_a_clear_message():
    index = OracleIndex(np.zeros((20, 4), np.float32), 10)
    with pytest.raises(DundiError, match="n=3 is out of range"):
        index.classify(np.zeros((1, 4), np.float32), TwoStepRule(3, 1, 1))
    with pytest.raises(DundiError, match="m=3 must be between"):
        index.classify(np.zeros((1, 4), np.float32), TwoStepRule(2, 3, 1))
    with pytest.raises(DundiError, match="k=11"):
        index.classify(np.zeros((1, 4), np.float32), TwoStepRule(2, 1, 11))
    with pytest.raises(DundiError, match="queries must have shape"):
        index.classify(np.zeros((1, 5), np.float32), TwoStepRule(2, 1, 1))
    assert index.classify(np.zeros((0, 4), np.float32), TwoStepRule(2, 1, 2)).labels.shape == (0,)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    vecs = rng.normal(size=(30, 8)).astype(np.float32)
    q = rng.normal(size=(50, 8)).astype(np.float32)
    index = OracleIndex(vecs, 10, meta={"seed": 7})
    index.save(tmp_path)
    loaded = OracleIndex.load(tmp_path)
    assert loaded.meta["seed"] == 7 and loaded.n == 3
    np.testing.assert_array_equal(loaded.classify(q, TwoStepRule(m=2, k=3)).labels, index.classify(q, TwoStepRule(m=2, k=3)).labels)


def test_select_oracles_is_seeded_and_class_major():
    labels = np.repeat(np.arange(4), 30)
    a = OracleIndex.select(labels, 5, seed=1, num_classes=4)
    assert (labels[a] == np.repeat(np.arange(4), 5)).all()
    assert (a == OracleIndex.select(labels, 5, seed=1, num_classes=4)).all()
    assert not (a == OracleIndex.select(labels, 5, seed=2, num_classes=4)).all()
    with pytest.raises(DundiError, match="fewer than n=31"):
        OracleIndex.select(labels, 31, seed=1, num_classes=4)


@pytest.mark.parametrize("num_classes,n,m,k", [(10, 20, 3, 5), (7, 6, 2, 3), (5000, 4, 2, 5)])
def test_two_step_sqeuclidean_equals_bruteforce_reference(num_classes, n, m, k):
    """The squared-Euclidean rule (the certifiable metric) through FAISS, on the one-matrix path
    and on the per-class block path (5000 classes), against the float64 reference."""
    rng = np.random.default_rng(3)
    oracles = rng.normal(size=(num_classes, n, 16)).astype(np.float32)
    queries = oracles[rng.integers(num_classes, size=40), 0] + rng.normal(0, 0.3, (40, 16)).astype(np.float32)
    index = OracleIndex(oracles.reshape(-1, 16), num_classes, metric="sqeuclidean")
    got = index.classify(queries, TwoStepRule(n, m, k)).labels
    ref = two_step_reference(torch.from_numpy(queries), torch.from_numpy(oracles), index.resolve(TwoStepRule(n, m, k))).numpy()
    np.testing.assert_array_equal(got, ref)
    euclid = two_step_reference(torch.from_numpy(queries), torch.from_numpy(oracles), resolved(oracles, TwoStepRule(n, m, k))).numpy()
    assert index.metric == "sqeuclidean" and got.shape == euclid.shape


def test_metric_survives_save_and_load(tmp_path):
    oracles = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    OracleIndex(oracles, 3, metric="sqeuclidean").save(tmp_path)
    assert OracleIndex.load(tmp_path).metric == "sqeuclidean"
    with pytest.raises(DundiError, match="unknown metric"):
        OracleIndex(oracles, 3, metric="cosine")
