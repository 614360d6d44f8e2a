"""One rule, one answer: every implementation of Algorithm 1 takes the same TwoStepRule and
answers alike on data built to tie, for many (n, m, k, metric) -- the index (FAISS or exact
float64 path), the literal float64 reference, the exact rule the certificate decides with, the
attacks' stand-in and the adaptive threat model built from the rule. And m left open means
min(3, n) everywhere, so no layer can serve another rule than the one asked for."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from dundi.errors import DundiError
from dundi.robustness.threats import build_threat
from dundi.rule.exact import ExactRule
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.rule.reference import TwoStepScorer, two_step_reference
from dundi.serving.model import ModelConfig
from test_two_step_standin import tied_oracles

RULES = [TwoStepRule(n, m, k) for n, m, k in itertools.product((1, 2, 4, 6), (None, 1, 3), (1, 2, 5, 7))
         if m is None or m <= n]


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_every_implementation_answers_the_same_rule_alike(metric):
    o, q = tied_oracles(1)
    index = OracleIndex(o.reshape(-1, 3), 7, metric=metric)
    qt = torch.from_numpy(q)
    for asked in RULES:
        rule = index.resolve(asked)
        assert rule.is_resolved and rule.metric == metric and rule.m == (asked.m or min(3, asked.n))
        served = index.classify(q, asked).labels
        oracles = torch.from_numpy(o[:, :rule.n].copy())
        np.testing.assert_array_equal(two_step_reference(qt, torch.from_numpy(o), rule).numpy(), served,
                                      err_msg=str(rule))
        with torch.no_grad():
            standin = TwoStepScorer(nn.Identity(), oracles, asked.resolved(rule.n, metric))(qt).argmax(1)
            threat = build_threat("adaptive", distance_net=nn.Identity(), oracles=oracles,
                                  rule=TwoStepRule(m=asked.m, k=asked.k, metric=metric)).model(qt).argmax(1)
        np.testing.assert_array_equal(standin.numpy(), served, err_msg=str(rule))
        np.testing.assert_array_equal(threat.numpy(), served, err_msg=str(rule))
        if metric == "sqeuclidean":  # the arithmetic the certificate proves
            np.testing.assert_array_equal(ExactRule(o, asked).classify(q).labels, served, err_msg=str(rule))


def test_an_open_m_is_min_3_n_in_every_layer():
    for n in (1, 2, 3, 20):
        assert TwoStepRule(n).resolved(20, "euclidean").m == min(3, n)
        assert ModelConfig("run", n=n).rule.resolved(20, "euclidean").m == min(3, n)
    assert TwoStepRule(m=3).at_n(1) == TwoStepRule(1, 1)  # a chosen m is clamped to a smaller n


def test_a_rule_the_index_cannot_honour_is_refused_in_one_line():
    index = OracleIndex(np.zeros((20, 4), np.float32), 10)
    for make, words in ((lambda: TwoStepRule(2, 3), "m=3 must be between 1 and n=2"),
                        (lambda: TwoStepRule(k=0), "k=0 must be a whole number"),
                        (lambda: TwoStepRule(metric="cosine"), "unknown metric"),
                        (lambda: index.resolve(TwoStepRule(3)), "at most 2 oracles"),
                        (lambda: index.resolve(TwoStepRule(k=11)), r"number of classes \(10\)"),
                        (lambda: index.resolve(TwoStepRule(metric="sqeuclidean")), "leave the metric")):
        with pytest.raises(DundiError, match=words):
            make()
