"""One rule, one answer: every implementation of Algorithm 1 takes the ResolvedRule the index
made and answers alike on data built to tie, for many (n, m, k) and both distances -- the
index's FAISS paths (one matrix; exact coarse + gathered blocks; a shortlist), the exact
float64 rule, the literal float64 reference, the attacks' stand-in and the adaptive threat
model over ``Run.oracle_tensor``'s view (classes holding fewer than n oracles included), and
the Certifier's own step-1/step-2 arithmetic, checked against brute force. And a rule is
resolved by the index only, so no layer can serve another rule than the one asked for."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from dundi.errors import DundiError
from dundi.robustness.certificate import Certifier
from dundi.robustness.threats import build_threat
from dundi.rule.distance import EUCLIDEAN, SQEUCLIDEAN, distance_named
from dundi.rule.index import OracleIndex
from dundi.rule.params import ResolvedRule, TwoStepRule
from dundi.rule.reference import TwoStepScorer, two_step_reference
from dundi.run.directory import Run
from dundi.serving.model import ModelConfig
from test_two_step_standin import tied_oracles

REQUESTS = [TwoStepRule(n, m, k) for n, m, k in itertools.product((1, 2, 4), (None, 1, 2), (1, 2, 3, 5, 8))
            if m is None or m <= n]


def short_tied(seed: int) -> tuple[np.ndarray, list[int], np.ndarray]:
    """(C=8, 4, D=3) small-integer oracles of which class c holds its first counts[c], built to
    tie: class 3 copies class 1 (same count); class 5 holds two copies of class 2's one oracle
    (equal means: a tie only the mean × n rescaling makes); classes 6 and 7 share their first
    two oracles (equal coarse sums at m <= 2). Counts are powers of two, so every rescaling is
    exact in every implementation; queries sit on the same integer grid."""
    rng = np.random.default_rng(seed)
    o = rng.integers(-3, 4, (8, 4, 3)).astype(np.float32)
    o[3] = o[1]
    o[5] = o[2, 0]
    o[7, :2] = o[6, :2]
    counts = [4, 2, 1, 2, 4, 2, 4, 2]
    q = rng.integers(-3, 4, (100, 3)).astype(np.float32)  # 7³ = 343 grid points: many repeat
    return o, counts, q


def index_over(o: np.ndarray, counts: list[int], metric: str, **kw) -> OracleIndex:
    rows = np.concatenate([o[c, :counts[c]] for c in range(len(o))])
    return OracleIndex(rows, counts=counts, metric=metric, **kw)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_implementation_answers_the_same_rule_alike(metric, seed, tmp_path):
    o, counts, q = short_tied(seed)
    index = index_over(o, counts, metric)
    paths = [index_over(o, counts, metric, full_limit=0),                      # exact coarse + blocks
             index_over(o, counts, metric, full_limit=0, exact_coarse_limit=0,  # a shortlist over centroids
                        shortlist=8, nprobe=64, shortlist_kind="ivf")]
    run = Run(tmp_path, nn.Identity(), {}, index)
    qt = torch.from_numpy(q)
    checked = 0
    for asked in REQUESTS:
        rule = index.resolve(asked)
        assert isinstance(rule, ResolvedRule) and rule.distance is distance_named(metric)
        assert rule.m == (asked.m or min(3, asked.n))
        served = index.classify(q, rule).labels
        for other in paths:
            np.testing.assert_array_equal(other.classify(q, other.resolve(asked)).labels, served, err_msg=str(rule))
        view = run.oracle_tensor(rule.n)                        # the index's padded view
        padded, mask = index.padded(rule.n)
        assert np.array_equal(view.numpy(), padded) and np.array_equal(mask.sum(1), np.minimum(counts, rule.n))
        np.testing.assert_array_equal(two_step_reference(qt, view, rule, counts=counts).numpy(), served,
                                      err_msg=str(rule))
        with torch.no_grad():
            standin = TwoStepScorer(nn.Identity(), view, rule, counts=counts)(qt).argmax(1)
            threat = build_threat("adaptive", distance_net=nn.Identity(), oracles=view, rule=rule,
                                  counts=counts).model(qt).argmax(1)
        np.testing.assert_array_equal(standin.numpy(), served, err_msg=f"stand-in {rule}")
        np.testing.assert_array_equal(threat.numpy(), served, err_msg=f"threat {rule}")
        if index.answers_exactly(rule):  # squared distance, every class full: the float64 rule answers
            np.testing.assert_array_equal(index.exact_rule(rule).classify(q).labels, served, err_msg=str(rule))
        checked += 1
    assert checked == len(REQUESTS) == 40


def test_the_data_ties_where_it_claims_to():
    """The ties the agreement test relies on are there: without the mean rescaling class 5
    would lose to class 2; duplicated class 3 never wins over class 1."""
    o, counts, q = short_tied(0)
    index = index_over(o, counts, "sqeuclidean")
    res = index.classify(q, index.resolve(TwoStepRule(2, 1, 8)))
    col2, col5 = (np.argmax(res.topk_classes == c, 1) for c in (2, 5))
    rows = np.arange(len(q))
    assert np.array_equal(res.fine_scores[rows, col2], res.fine_scores[rows, col5])
    assert (col2 < col5).all() and not (res.labels == 3).any() and not (res.labels == 5).any()


def brute_force_certified(z: np.ndarray, o: np.ndarray, y: int, n: int, m: int, k: int) -> bool:
    """Whether §4's two conditions hold at eps 0, in exact integer arithmetic: fewer than k
    other classes have a coarse sum <= y's, and every other class not certainly out of step 1
    (k classes strictly nearer) has a fine sum strictly above y's."""
    d2 = ((z[None, None, :] - o) ** 2).sum(-1).astype(np.int64)        # (C, n): exact integers
    coarse, fine = d2[:, :m].sum(1), d2[:, :n].sum(1)
    others = [c for c in range(len(o)) if c != y]
    keeps = sum(coarse[c] <= coarse[y] for c in others) < k
    out = lambda c: (coarse < coarse[c]).sum() >= k  # noqa: E731
    picks = all(fine[c] > fine[y] for c in others if not out(c))
    return bool(keeps and picks)


def test_the_certifier_s_step_arithmetic_is_the_rule_s_on_ties():
    """The Certifier decides §4's conditions with the index's own exact rule: at eps 0 it
    certifies a label exactly where brute force in integers finds both steps strict (ties
    included: a tie is never certified), and never a label the rule does not answer."""
    o, q = tied_oracles(2)
    index = OracleIndex(o.reshape(-1, 3), 7, metric="sqeuclidean")
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 3))
    with torch.no_grad():  # z = 8x - 4: exact for x on the grid (q + 4) / 8 in [0, 1]
        net[1].weight.copy_(8 * torch.eye(3))
        net[1].bias.fill_(-4.0)
    x = torch.from_numpy((q[:120] + 4) / 8).reshape(-1, 1, 1, 3)
    strict = 0
    for asked in (TwoStepRule(6, 3, 2), TwoStepRule(4, 1, 3), TwoStepRule(6, 6, 1), TwoStepRule(2, 2, 5)):
        rule = index.resolve(asked)
        cert = Certifier(net, index, rule)
        assert cert.exact is index.exact_rule(rule)     # one object answers and is proven
        labels = index.classify(q[:120], rule).labels
        for y in range(7):
            got = cert.certified_at(x, torch.full((120,), y), 0.0).numpy()
            want = np.array([brute_force_certified(z, o[:, :rule.n], y, rule.n, rule.m, rule.k) for z in q[:120]])
            np.testing.assert_array_equal(got, want, err_msg=f"{rule} label {y}")
            assert (labels[got] == y).all()
            strict += int(want.sum())
    assert strict > 100  # most answers are strict; the rest are the ties


def test_only_the_index_resolves_and_consumers_take_what_it_made():
    index = OracleIndex(np.zeros((20, 4), np.float32), 10, metric="sqeuclidean")
    rule = index.resolve(TwoStepRule(k=3))
    assert rule.as_dict() == {"n": 2, "m": 2, "k": 3, "metric": "sqeuclidean"}
    assert pickle.loads(pickle.dumps(rule)) == rule and index.resolve(rule) is rule
    with pytest.raises(TypeError, match="OracleIndex.resolve"):
        ResolvedRule(2, 2, 3, SQEUCLIDEAN)
    with pytest.raises(TypeError, match="OracleIndex.resolve"):
        two_step_reference(torch.zeros(1, 4), torch.zeros(10, 2, 4), TwoStepRule(2, 2, 3))
    other = OracleIndex(np.zeros((20, 4), np.float32), 10)
    with pytest.raises(DundiError, match="ranks by sqeuclidean distance but the index by euclidean"):
        other.classify(np.zeros((1, 4), np.float32), rule)
    assert other.resolve().distance is EUCLIDEAN


def test_an_open_m_is_min_3_n_in_every_layer():
    index = OracleIndex(np.zeros((200, 2), np.float32), 10)
    for n in (1, 2, 3, 20):
        assert index.resolve(TwoStepRule(n)).m == min(3, n)
        assert index.resolve(ModelConfig("run", n=n).rule).m == min(3, n)
    assert TwoStepRule(m=3).at_n(1) == TwoStepRule(1, 1)  # a chosen m is clamped to a smaller n


def test_a_rule_the_index_cannot_honour_is_refused_in_one_line():
    index = OracleIndex(np.zeros((20, 4), np.float32), 10)
    for make, words in ((lambda: TwoStepRule(2, 3), "m=3 must be between 1 and n=2"),
                        (lambda: TwoStepRule(k=0), "k=0 must be a whole number"),
                        (lambda: OracleIndex(np.zeros((2, 2), np.float32), 1, metric="cosine"), "unknown metric"),
                        (lambda: index.resolve(TwoStepRule(3)), "at most 2 oracles"),
                        (lambda: index.resolve(TwoStepRule(k=11)), r"number of classes \(10\)")):
        with pytest.raises(DundiError, match=words):
            make()
