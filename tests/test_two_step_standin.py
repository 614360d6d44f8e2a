"""The adaptive stand-in is Algorithm 1: its argmax equals the FAISS rule's label for k < C,
on random data built to tie and on a real trained run, under both metrics; and attacks
stop, restart and accept on the deciding rule's label, not on the stand-in's argmax."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from dundi.attacks import PGD, Square
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.rule.reference import TwoStepScorer, two_step_reference
from rule_helpers import resolved


def tied_oracles(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(C=7, n=6, D=3) small-integer oracles where classes 3 and 5 copy classes 1 and 2 (exact
    ties in both steps), and integer queries on the same grid (many tied distances)."""
    rng = np.random.default_rng(seed)
    o = rng.integers(-3, 4, (7, 6, 3)).astype(np.float32)
    o[3], o[5] = o[1], o[2]
    o[6, :3] = o[4, :3]  # equal coarse sums, different fine sums
    q = rng.integers(-3, 4, (300, 3)).astype(np.float32)
    return o, q


def standin_labels(o: np.ndarray, q: np.ndarray, n: int, m: int, k: int, metric: str) -> np.ndarray:
    scorer = TwoStepScorer(nn.Identity(), torch.from_numpy(o[:, :n]), resolved(o[:, :n], TwoStepRule(m=m, k=k), metric),
                           eps=0.0)
    with torch.no_grad():
        return scorer(torch.from_numpy(q)).argmax(1).numpy()


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("full_limit", [4096, 0])  # one FAISS matrix / exact coarse + gathered blocks
def test_standin_argmax_is_the_faiss_rule_with_ties(metric, full_limit):
    o, q = tied_oracles(0)
    index = OracleIndex(o.reshape(-1, 3), 7, metric=metric, full_limit=full_limit)
    checked = 0
    for n, m, k in itertools.product((6, 4), (1, 3), (1, 2, 3, 5, 6)):
        rule = index.classify(q, TwoStepRule(n, m, k)).labels
        np.testing.assert_array_equal(standin_labels(o, q, n, m, k, metric), rule,
                                      err_msg=f"n={n} m={m} k={k} {metric}")
        ref = two_step_reference(torch.from_numpy(q), torch.from_numpy(o), index.resolve(TwoStepRule(n, m, k))).numpy()
        np.testing.assert_array_equal(ref, rule)
        checked += 1
    # the data really ties: the all-class argmax (k = C) differs from the rule with k < C
    all_class = standin_labels(o, q, 6, 3, 7, metric)
    assert (all_class != index.classify(q, TwoStepRule(6, 3, 2)).labels).any()
    assert checked == 20


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_standin_argmax_is_the_rule_on_a_real_run(mnist_runs, data_dir, metric):
    from dundi.data import load_split
    from dundi.evaluation.plan import select_samples
    from dundi.run.directory import Run

    run = Run.load(mnist_runs["dundi"])
    images, _, _ = load_split("mnist-10k", "test", data_dir)
    images = images[select_samples(len(images), 200, seed=2)]
    blocks = run.oracle.blocks
    index = OracleIndex(blocks.reshape(-1, blocks.shape[-1]), run.oracle.num_classes, metric=metric)
    emb = run.embed(images)
    differs = 0
    for n, m, k in ((10, 3, 1), (10, 3, 2), (10, 3, 5), (5, 2, 3), (10, 10, 9)):
        rule = index.classify(emb, TwoStepRule(n, m, k)).labels
        scorer = TwoStepScorer(run.model, torch.from_numpy(blocks[:, :n].copy()), index.resolve(TwoStepRule(n, m, k)),
                               scale=n)
        with torch.no_grad():
            ours = scorer(torch.from_numpy(images)).argmax(1).numpy()
        np.testing.assert_array_equal(ours, rule, err_msg=f"n={n} m={m} k={k}")
        differs += int((index.classify(emb, TwoStepRule(n, m, 10)).labels != rule).sum())
    assert differs > 0  # k < C matters on this run: the all-class label is not the rule's


def test_dropped_classes_keep_their_gradient():
    o, q = tied_oracles(1)
    x = torch.from_numpy(q[:20]).requires_grad_(True)
    scores = TwoStepScorer(nn.Identity(), torch.from_numpy(o), resolved(o, TwoStepRule(m=2, k=2)))(x)
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert grad.abs().sum() > 0
    kept = scores.argsort(1, descending=True)[:, :2]
    dropped = scores.argsort(1, descending=True)[:, 2:]
    assert (scores.gather(1, dropped).amax(1) < scores.gather(1, kept).amin(1)).all()


class Flat(nn.Module):
    """Per-pixel embedding of a small image, for attacks that need an image-shaped input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3] * 6 - 3


def scorer_with_rule(rule) -> TwoStepScorer:
    o, _ = tied_oracles(2)
    return TwoStepScorer(Flat(), torch.from_numpy(o), resolved(o, TwoStepRule(m=3, k=3)), judge=rule)


def test_pgd_restarts_on_the_rule_label():
    """A rule that always answers class 0: every sample of another class counts as fooled
    after the first restart, the class-0 samples get all restarts."""
    x = torch.rand(24, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(24) % 3
    zero = lambda emb: torch.zeros(len(emb), dtype=torch.int64)  # noqa: E731
    res = PGD(scorer_with_rule(zero), eps=0.05, alpha=0.01, steps=4, restarts=3, loss="margin").run(x, y)
    assert (res.steps[y != 0] == 4).all()
    assert (res.steps[y == 0] == 12).all()


def test_square_accepts_and_stops_on_the_rule_label():
    x = torch.rand(24, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(24) % 3
    zero = lambda emb: torch.zeros(len(emb), dtype=torch.int64)  # noqa: E731
    res = Square(scorer_with_rule(zero), eps=0.05, n_queries=30, seed=0).run(x, y)
    assert (res.steps[y != 0] == 1).all()
    assert (res.steps[y == 0] == 30).all()


def test_step1_attack_drops_the_true_class_from_the_top_k():
    """APGD on the coarse margin fools mostly through step 1 (the true class is no longer
    among the k classes the FAISS rule keeps; it stops at any wrong label, so some fall on
    the way by the fine step), and AutoAttack runs it on the stand-in only where step 1
    drops classes."""
    from dundi.attacks import APGDStep1, AutoAttack

    o, _ = tied_oracles(3)
    index = OracleIndex(o.reshape(-1, 3), 7)
    rule = lambda emb: torch.from_numpy(index.classify(emb.numpy(), TwoStepRule(6, 3, 2)).labels)  # noqa: E731
    scorer = TwoStepScorer(Flat(), torch.from_numpy(o), index.resolve(TwoStepRule(m=3, k=2)), judge=rule)
    x = torch.rand(200, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    y = torch.from_numpy(index.classify(Flat()(x).numpy(), TwoStepRule(6, 3, 2)).labels)  # correct clean
    res = APGDStep1(scorer, eps=0.1, steps=30, seed=0).run(x, y)
    emb = Flat()(res.adv).numpy()
    out = index.classify(emb, TwoStepRule(6, 3, 2))
    fooled = out.labels != y.numpy()
    assert fooled.sum() >= 20
    dropped = ~(out.topk_classes == y.numpy()[:, None]).any(1)
    assert dropped[fooled].mean() > 0.5 and dropped.sum() >= 15
    assert (res.adv - x).abs().max() <= 0.1 + 1e-6
    names = [a.name for a in AutoAttack(scorer, eps=0.1).components()]
    assert names == ["apgd", "apgd-step1", "apgd-t", "fab-t", "square"]
    every = TwoStepScorer(Flat(), torch.from_numpy(o), index.resolve(TwoStepRule(m=3, k=7)))
    assert "apgd-step1" not in [a.name for a in AutoAttack(every, eps=0.1).components()]
