"""The certificate's bounds on the selective signals it covers (the fine-score margin and the
blank guard: Certifier._selective_slack), against brute force over the ball."""

import torch

from dundi.robustness.certificate import AbstainGate
from dundi.rule.params import TwoStepRule
from rule_helpers import certifier
from test_certificate import _problem, box_samples, vertices


def _margin_and_label(net, oracles, x, n, m, k):
    """The rule's label and fine-score margin over the runner-up kept class, per oracle
    (float64, as dundi.rule.selective_signals.fine_margin on the served scores)."""
    with torch.no_grad():
        z = net(x).double()
    d2 = ((z[:, None, None, :] - oracles.double()[None]) ** 2).sum(-1)
    top = torch.argsort(d2[:, :, :m].sum(-1), dim=1, stable=True)[:, :k]
    fine = torch.gather(-d2[:, :, :n].sum(-1), 1, top)
    best = fine.argmax(1, keepdim=True)
    runner = fine.scatter(1, best, -torch.inf).max(1).values
    return top.gather(1, best).squeeze(1), (fine.gather(1, best).squeeze(1) - runner) / n


def test_no_point_of_a_certified_ball_lowers_the_margin_or_the_range_past_the_gate():
    n, m, k = 5, 2, 3
    net, oracles, queries = _problem(7)
    labels, margin = _margin_and_label(net, oracles, queries, n, m, k)
    gate = AbstainGate(abstain_min_margin=float(margin.median()) * 0.5, abstain_min_range=0.3)
    cert = certifier(net, oracles, TwoStepRule(n, m, k))
    plain = cert.radius(queries, labels)
    gated = cert.radius(queries, labels, gate=gate)
    assert (gated <= plain + 1e-12).all() and (gated < plain).any(), "the gate never bound"
    checked = 0
    for i in torch.nonzero(gated > 0).flatten().tolist():
        pts = torch.cat([vertices(queries[i], float(gated[i])),
                         box_samples(queries[i:i + 1], float(gated[i]), 300, i)[:, 0]]).float()
        got, got_margin = _margin_and_label(net, oracles, pts, n, m, k)
        span = pts.flatten(1).max(1).values - pts.flatten(1).min(1).values
        assert (got == labels[i]).all()
        assert (got_margin >= gate.abstain_min_margin).all(), f"sample {i}: margin below the gate"
        assert (span >= gate.abstain_min_range).all(), f"sample {i}: range below the guard"
        checked += 1
    assert checked >= 4, "too few certified samples: the test checks nothing"
    # a blank-ish image is never certified at any radius with the guard on
    flat = torch.full((1, 1, 4, 4), 0.5)
    assert not cert.certified_at(flat, labels[:1], 0.0, gate=AbstainGate(abstain_min_range=0.1)).any()


def test_the_gate_alone_with_only_selective_signals_is_accepted():
    n, m, k = 5, 2, 2
    net, oracles, queries = _problem(3)
    labels, _ = _margin_and_label(net, oracles, queries, n, m, k)
    cert = certifier(net, oracles, TwoStepRule(n, m, k))
    gate = AbstainGate(abstain_min_margin=0.0)
    # margin 0 costs nothing beyond step 2's own condition (a strict win is a positive margin)
    assert torch.equal(cert.certified_at(queries, labels, 0.05, gate=gate),
                       cert.certified_at(queries, labels, 0.05))
