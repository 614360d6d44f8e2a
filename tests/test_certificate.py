"""Soundness of interval bounds and of the two-step certificate, checked against brute force.

Every test here compares a bound with values actually reached: dense random samples of the
input box, and all of its vertices on inputs small enough to enumerate them. A certificate
that any sampled input contradicts fails the test.
"""

import itertools

import pytest
import torch
from torch import nn

from dundi.errors import DundiError
from dundi.nets.bounds import input_box, interval_bounds, propagate, split_last_linear
from dundi.nets.models import DistanceNet
from dundi.rule.params import TwoStepRule
from dundi.rule.reference import two_step_reference
from dundi.training.certified import oracle_head, worst_case_logits
from rule_helpers import certifier, resolved


def tiny_net(seed: int, pool: bool = True, batchnorm: bool = True) -> DistanceNet:
    """A Distance NN on 1×4×4 inputs with every layer kind the bounds support."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 3, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(3))
    layers.append(nn.ReLU())
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers.append(nn.Flatten())
    backbone = nn.Sequential(*layers)
    dim = 3 * (4 if pool else 16)
    net = DistanceNet(backbone, dim, embed_dim=6, hidden=8)
    if batchnorm:  # non-trivial running statistics, some negative scales
        bn = backbone[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(-1.5, 1.5)
    return net.eval()


def box_samples(x: torch.Tensor, eps: float, count: int, seed: int) -> torch.Tensor:
    """``count`` random points of the clipped box around each image, plus its corners pushed
    to the faces (uniform in the box, then half of them snapped to a random vertex)."""
    lo, hi = input_box(x, eps)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((count, *x.shape), generator=g, dtype=x.dtype)
    snap = torch.rand((count, 1, 1, 1, 1), generator=g) < 0.5
    u = torch.where(snap, (u > 0.5).to(x.dtype), u)
    return lo + u * (hi - lo)


def vertices(x: torch.Tensor, eps: float) -> torch.Tensor:
    """All 2^D vertices of the clipped box around one image (D pixels)."""
    lo, hi = input_box(x, eps)
    flat_lo, flat_hi = lo.flatten(), hi.flatten()
    corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=flat_lo.numel())), dtype=x.dtype)
    return (flat_lo + corners * (flat_hi - flat_lo)).view(-1, *x.shape)


@pytest.mark.parametrize("pool,batchnorm", [(True, True), (False, False)])
def test_interval_bounds_contain_every_sampled_value_and_vertex(pool, batchnorm):
    net = tiny_net(0, pool, batchnorm).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    lo, hi = interval_bounds(net, *input_box(x, 0.15))
    with torch.no_grad():
        for i in range(len(x)):
            pts = torch.cat([vertices(x[i], 0.15), box_samples(x[i:i + 1], 0.15, 2000, i)[:, 0]])
            out = net(pts)
            assert (out >= lo[i] - 1e-12).all() and (out <= hi[i] + 1e-12).all()
            # not vacuous: the box is not wider than needed by orders of magnitude
            assert ((hi[i] - lo[i]) < 50 * (out.amax(0) - out.amin(0) + 1e-6)).all()


def test_unsupported_layers_are_refused_by_name():
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(DundiError, match="Tanh"):
        interval_bounds(net, torch.zeros(1, 4), torch.ones(1, 4))


def _problem(seed: int, num_classes: int = 4, n: int = 5):
    """A tiny net, an oracle set from clustered inputs, and queries near the clusters."""
    net = tiny_net(seed)
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand((num_classes, 1, 4, 4), generator=g)
    spread = lambda count: 0.08 * torch.randn((count, 1, 4, 4), generator=g)
    oracle_x = (centres.repeat_interleave(n, 0) + spread(num_classes * n)).clamp(0, 1)
    with torch.no_grad():
        oracles = net(oracle_x).view(num_classes, n, -1)
    queries = (centres.repeat(6, 1, 1, 1) + spread(6 * num_classes)).clamp(0, 1)
    return net, oracles, queries


def _rule(net, oracles, x, n, m, k):
    """Algorithm 1 (squared Euclidean) in float64, vectorised over many inputs: steps as in
    dundi.rule.index, ties to the lower class in step 1 and to the step-1 order in step 2."""
    with torch.no_grad():
        z = net(x).double()
    d2 = ((z[:, None, None, :] - oracles.double()[None]) ** 2).sum(-1)
    top = torch.argsort(d2[:, :, :m].sum(-1), dim=1, stable=True)[:, :k]  # nearest first
    fine = torch.gather(-d2[:, :, :n].sum(-1), 1, top)
    return top.gather(1, fine.argmax(1, keepdim=True)).squeeze(1)


def test_vectorised_rule_matches_the_literal_reference():
    net, oracles, queries = _problem(9)
    with torch.no_grad():
        ref = two_step_reference(net(queries), oracles, resolved(oracles, TwoStepRule(5, 2, 2), "sqeuclidean"))
    assert torch.equal(_rule(net, oracles, queries, 5, 2, 2), ref)


@pytest.mark.parametrize("seed,n,m,k", [(0, 5, 2, 2), (1, 5, 3, 3), (2, 4, 1, 1), (3, 5, 5, 4)])
def test_two_step_certificate_is_never_contradicted_by_brute_force(seed, n, m, k):
    net, oracles, queries = _problem(seed)
    labels = _rule(net, oracles, queries, n, m, k)
    cert = certifier(net, oracles, TwoStepRule(n, m, k))
    radius = cert.radius(queries, labels)
    assert (radius > 0).sum() >= len(queries) // 4, "the test needs certified samples to check"
    for i in torch.nonzero(radius > 0).flatten().tolist():
        pts = torch.cat([vertices(queries[i], float(radius[i])),
                         box_samples(queries[i:i + 1], float(radius[i]), 300, i)[:, 0]])
        got = _rule(net, oracles, pts.float(), n, m, k)
        assert (got == labels[i]).all(), f"sample {i} certified at {float(radius[i]):.4f} but flipped"


def test_radius_is_the_bisection_threshold():
    net, oracles, queries = _problem(4)
    labels = _rule(net, oracles, queries, 5, 2, 2)
    cert = certifier(net, oracles, TwoStepRule(5, 2, 2))
    radius = cert.radius(queries, labels, eps_max=0.5, steps=10)
    step = 0.5 / 2 ** 10
    inside = radius > 0
    assert cert.certified_at(queries[inside], labels[inside], radius[inside]).all()
    below_max = inside & (radius < 0.5)
    assert not cert.certified_at(queries[below_max], labels[below_max], radius[below_max] + step).any()


def test_certificate_at_zero_means_the_rule_answers_that_label():
    net, oracles, queries = _problem(5)
    labels = _rule(net, oracles, queries, 5, 2, 2)
    cert = certifier(net, oracles, TwoStepRule(5, 2, 2))
    wrong = (labels + 1) % oracles.shape[0]
    assert not cert.certified_at(queries, wrong, 0.0).any()
    assert cert.certified_at(queries, labels, 0.0).float().mean() > 0.9  # strict margins almost always


def test_swapping_and_adding_oracles_keeps_certificates_sound():
    """The bounds on the query do not depend on the oracles: a new oracle set needs no new
    training, and its certificates are as sound as the first set's."""
    net, oracles, queries = _problem(6, n=5)
    g = torch.Generator().manual_seed(1)
    extra = oracles[:, :3] + 0.05 * torch.randn(oracles[:, :3].shape, generator=g)
    for swapped in (oracles.flip(1), torch.cat([oracles, extra], 1)):
        n = swapped.shape[1]
        labels = _rule(net, swapped, queries, n, 2, 2)
        radius = certifier(net, swapped, TwoStepRule(n, 2, 2)).radius(queries, labels)
        assert (radius > 0).any()
        for i in torch.nonzero(radius > 0).flatten().tolist():
            pts = box_samples(queries[i:i + 1], float(radius[i]), 300, i)[:, 0]
            assert (_rule(net, swapped, pts.float(), n, 2, 2) == labels[i]).all()


def test_certifier_refuses_impossible_settings():
    net, oracles, _ = _problem(0)
    with pytest.raises(DundiError, match="m=6 must be between 1 and n=5"):
        certifier(net, oracles, TwoStepRule(5, 6, 2))
    with pytest.raises(DundiError, match="k=9 must be between 1 and the number of classes"):
        certifier(net, oracles, TwoStepRule(5, 2, 9))


def test_training_head_ranks_like_mean_squared_distance_to_the_other_members():
    torch.manual_seed(0)
    emb = torch.randn(24, 5)
    labels = torch.arange(4).repeat(6)
    weights, biases = oracle_head(emb, labels, 4)
    logits = (weights @ emb[:, :, None]).squeeze(-1) + biases
    for i in range(len(emb)):
        others = [(emb[j] - emb[i]).pow(2).sum() for j in range(len(emb)) if j != i]
        mean_d2 = torch.stack([torch.stack([(emb[j] - emb[i]).pow(2).sum() for j in range(len(emb))
                                            if j != i and labels[j] == c]).mean() for c in range(4)])
        # logits = −mean squared distance + ‖z‖² (the same for every class)
        torch.testing.assert_close(logits[i], -mean_d2 + emb[i].pow(2).sum(), rtol=1e-5, atol=1e-4)
        assert len(others) == 23


def test_training_worst_case_logits_bound_every_sampled_input():
    net = tiny_net(7, pool=False, batchnorm=False).double()
    body, last = split_last_linear(net)
    torch.manual_seed(1)
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64)
    labels = torch.arange(4).repeat(2)
    with torch.no_grad():
        weights, biases = oracle_head(net(x), labels, 4)
        h_lo, h_hi = propagate(body, *input_box(x, 0.1))
        worst = worst_case_logits(h_lo, h_hi, last, weights, biases, labels)
        for i in range(len(x)):
            z = net(box_samples(x[i:i + 1], 0.1, 500, i)[:, 0])
            logits = z @ weights[i].T + biases[i]
            diff = logits - logits[:, labels[i]:labels[i] + 1]
            assert (diff <= worst[i] + 1e-9).all()


def test_many_class_path_is_sound_and_never_less_conservative(monkeypatch):
    """Beyond PAIRWISE_CLASS_LIMIT classes the certificate skips the C² coarse pairs: it must
    certify a subset of what the pairwise form certifies (here forced on 4 classes)."""
    import dundi.robustness.certificate as certificate

    net, oracles, queries = _problem(8)
    labels = _rule(net, oracles, queries, 5, 2, 2)
    pairwise = certifier(net, oracles, TwoStepRule(5, 2, 2)).certified_at(queries, labels, 0.02)
    monkeypatch.setattr(certificate, "PAIRWISE_CLASS_LIMIT", 1)
    single = certifier(net, oracles, TwoStepRule(5, 2, 2)).certified_at(queries, labels, 0.02)
    assert single.any() and not (single & ~pairwise).any()
    for i in torch.nonzero(single).flatten().tolist():
        pts = box_samples(queries[i:i + 1], 0.02, 300, i)[:, 0]
        assert (_rule(net, oracles, pts.float(), 5, 2, 2) == labels[i]).all()
