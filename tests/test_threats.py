"""Threat models on real runs: the adaptive scorer is the two-step rule when k covers all
classes, and the feature attack really pulls embeddings towards another class's oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dundi.data import load_split
from dundi.errors import DundiError
from dundi.evaluation.plan import select_samples
from dundi.robustness.threats import FeatureScorer, build_threat
from dundi.rule.params import TwoStepRule
from dundi.run.directory import Run


@pytest.fixture(scope="module")
def subject(mnist_runs, data_dir):
    run = Run.load(mnist_runs["dundi"])
    native = Run.load(mnist_runs["native"])
    images, labels, _ = load_split("mnist-10k", "test", data_dir)
    pick = select_samples(len(labels), 96, seed=1)
    return run, native, images[pick], labels[pick]


def test_adaptive_argmax_is_the_two_step_label_with_k_equal_to_classes(subject):
    run, _, images, _ = subject
    num_classes = run.oracle.num_classes
    for n in (run.oracle.n, 3):
        rule = run.oracle.resolve(TwoStepRule(n, k=num_classes))
        threat = build_threat("adaptive", distance_net=run.model, oracles=run.oracle_tensor(n), rule=rule)
        with torch.no_grad():
            scores = threat.model(torch.from_numpy(images))
        two_step = run.classify(images, TwoStepRule(n, min(3, n), num_classes)).labels
        np.testing.assert_array_equal(scores.argmax(1).numpy(), two_step)
        # and the score is the fine step's, divided by n: compare with FAISS's fine scores
        res = run.oracle.classify(run.embed(images), TwoStepRule(n, min(3, n), num_classes))
        fine = np.take_along_axis(scores.numpy(), res.topk_classes, 1) * n
        np.testing.assert_allclose(fine, res.fine_scores, rtol=1e-4, atol=1e-3)


def test_transfer_is_the_native_model(subject):
    run, native, images, _ = subject
    threat = build_threat("transfer", native=native.model)
    with torch.no_grad():
        np.testing.assert_array_equal(threat.model(torch.from_numpy(images)).argmax(1).numpy(),
                                      native.model(torch.from_numpy(images)).argmax(1).numpy())
    with pytest.raises(DundiError, match="native"):
        build_threat("transfer")
    with pytest.raises(DundiError, match="unknown threat"):
        build_threat("telepathy", native=native.model)


def test_feature_scores_match_brute_force(subject):
    run, _, images, _ = subject
    oracles = run.oracle_tensor()
    scorer = FeatureScorer(run.model, oracles, nearest=2)
    with torch.no_grad():
        scores = scorer(torch.from_numpy(images[:8])).numpy()
    emb = run.embed(images[:8]).astype(np.float64)
    o = oracles.numpy().astype(np.float64)
    for b in range(8):
        for c in range(o.shape[0]):
            d = sorted(np.linalg.norm(o[c] - emb[b], axis=1))
            assert scores[b, c] == pytest.approx(-(d[0] + d[1]) / 2, rel=1e-4, abs=1e-4)


def _class_distances(emb: np.ndarray, oracles: np.ndarray, q: int) -> np.ndarray:
    """(B, C): mean distance from each embedding to the q nearest oracles of each class."""
    d = np.linalg.norm(emb[:, None, None, :] - oracles[None], axis=-1)   # (B, C, n)
    return np.sort(d, axis=-1)[:, :, :q].mean(-1)


def test_feature_attack_pulls_embeddings_towards_another_class(subject):
    from dundi.attacks import make_attack

    run, _, images, labels = subject
    x, y = torch.from_numpy(images[:64]), torch.from_numpy(labels[:64])
    oracles = run.oracle_tensor()
    threat = build_threat("feature", distance_net=run.model, oracles=oracles, nearest=3, rule=run.oracle.resolve())
    adv = make_attack("pgd", threat.model, eps=0.1, steps=10, alpha=0.02, seed=0).run(x, y).adv
    before = _class_distances(run.embed(x.numpy()), oracles.numpy(), 3)
    after = _class_distances(run.embed(adv.numpy()), oracles.numpy(), 3)
    rows = np.arange(len(y))
    others = after.copy()
    others[rows, y.numpy()] = np.inf
    goal = others.argmin(1)  # the other class the adversarial embedding is now closest to
    with torch.no_grad():
        clean_ok = (threat.model(x).argmax(1) == y).numpy()
        moved = (threat.model(adv).argmax(1) != y).numpy()
    # Samples already nearer another class only get pushed off their own; the others must be
    # pulled towards another class's oracles.
    assert clean_ok.sum() >= 20
    closer = (after[rows, goal] < before[rows, goal])[clean_ok]
    assert closer.mean() > 0.9, f"only {closer.mean():.0%} of embeddings moved towards another class"
    own0, own1 = before[rows, y.numpy()], after[rows, y.numpy()]
    assert (own1 > own0).mean() > 0.8  # and away from their own class's oracles
    gap0 = (before[rows, goal] - own0)[clean_ok]
    gap1 = (after[rows, goal] - own1)[clean_ok]
    assert gap1.mean() < gap0.mean() - 0.5
    assert moved[clean_ok].mean() > 0.3  # the feature scorer now names another class for many
