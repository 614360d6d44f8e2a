"""The paper's triplet loss, the margin loss, batch-hard mining, and tuple sampling."""

import numpy as np
import pytest
import torch

from dundi.training.losses import distance, mine_batch_hard, triplet_loss
from dundi.training.tuples import sample_tuples


def test_sigmoid_loss_matches_the_paper_formula():
    a, p, n = torch.randn(3, 64, 16).unbind(0)
    d_ap = torch.linalg.vector_norm(a - p, dim=1)
    d_an = torch.linalg.vector_norm(a - n, dim=1)
    expected = 1 - 1 / (1 + torch.exp(-(d_an - d_ap)))
    got = triplet_loss(distance(a, p), distance(a, n), "sigmoid")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert ((got > 0) & (got < 1)).all()


def test_sigmoid_loss_falls_as_negatives_move_away():
    d_ap = torch.ones(5)
    losses = triplet_loss(d_ap, torch.tensor([0.0, 1.0, 2.0, 5.0, 20.0]), "sigmoid")
    assert (losses[1:] < losses[:-1]).all()
    assert losses[1] == pytest.approx(0.5)


def test_sigmoid_loss_keeps_a_gradient_far_from_the_boundary():
    """At d_an − d_ap = 30 the loss is ~1e-13, not 0, and its gradient still points the way
    (adversarial training and attacks climb it)."""
    d_an = torch.tensor([31.0], dtype=torch.float32, requires_grad=True)
    loss = triplet_loss(torch.ones(1), d_an, "sigmoid")
    loss.sum().backward()
    assert 0 < loss.item() < 1e-12 and d_an.grad.item() < 0


def test_margin_loss_and_unknown_kind():
    got = triplet_loss(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.5]), "margin", margin=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="unknown triplet loss"):
        triplet_loss(torch.ones(1), torch.ones(1), "hinge")


def test_batch_hard_mining_against_brute_force():
    emb = torch.randn(12, 4)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 1, 0])  # class 3 has no positive
    d_ap, d_an = mine_batch_hard(emb, labels)
    exp_ap, exp_an = [], []
    for i in range(12):
        pos = [j for j in range(12) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(12) if labels[j] != labels[i]]
        if pos:
            exp_ap.append(max(torch.dist(emb[i], emb[j]) for j in pos))
            exp_an.append(min(torch.dist(emb[i], emb[j]) for j in neg))
    torch.testing.assert_close(d_ap, torch.stack(exp_ap), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_an, torch.stack(exp_an), rtol=1e-4, atol=1e-5)


def test_tuples_respect_classes_and_are_seeded():
    labels = np.repeat(np.arange(5), [3, 10, 7, 2, 50])
    t = sample_tuples(labels, 5000, seed=3)
    assert t.shape == (5000, 3) and t.dtype == np.int64
    assert (labels[t[:, 0]] == labels[t[:, 1]]).all()
    assert (t[:, 0] != t[:, 1]).all()
    assert (labels[t[:, 0]] != labels[t[:, 2]]).all()
    # anchor classes uniform, not proportional to class size
    counts = np.bincount(labels[t[:, 0]], minlength=5)
    assert counts.min() > 800
    np.testing.assert_array_equal(t, sample_tuples(labels, 5000, seed=3))
    assert not np.array_equal(t, sample_tuples(labels, 5000, seed=4))


def test_tuples_refuse_impossible_data():
    with pytest.raises(ValueError, match="two classes"):
        sample_tuples(np.zeros(10, int), 5, 0)
    with pytest.raises(ValueError, match="at least two samples"):
        sample_tuples(np.array([0, 1, 1]), 5, 0)
