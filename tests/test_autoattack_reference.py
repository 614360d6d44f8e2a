"""AutoAttack's components and cascade against torchattacks 3.5.1, the independent
reference: same model, same images, same seed, one process.

The implementations differ in their random numbers and in where a sample stops (ours leave
the batch once fooled; FAB stops once within eps), so the comparison is on what must agree:
the budget is kept and robust accuracy is within two samples of 32 (or equal)."""

from __future__ import annotations

import pytest
import torch

from dundi.attacks import APGD, APGDT, FABT, AutoAttack, make_attack

try:
    from test_attacks import K, one_thread, subject, ta, trained  # noqa: F401  (one_thread: autouse fixture)
except ImportError:  # collected as part of a package
    from tests.test_attacks import K, one_thread, subject, ta, trained  # noqa: F401

TOL = 2  # samples of 32


def fooled(net, adv, y) -> torch.Tensor:
    with torch.no_grad():
        return net(adv).argmax(1) != y


def compare(net, x, y, ours, theirs, eps: float) -> tuple[int, int]:
    assert (ours - x).abs().max() <= eps + 1e-6 and ours.min() >= 0 and ours.max() <= 1
    f_ours, f_theirs = fooled(net, ours, y), fooled(net, theirs, y)
    assert int(f_ours.sum()) >= int(f_theirs.sum()) - TOL, (int(f_ours.sum()), int(f_theirs.sum()))
    return int(f_ours.sum()), int(f_theirs.sum())


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_as_strong_as_torchattacks(ta, subject, loss):
    net, x, y = subject
    ours = APGD(net, eps=0.12, steps=30, loss=loss, seed=0)(x, y)
    with torch.random.fork_rng():
        theirs = ta.APGD(net, eps=0.12, steps=30, loss=loss, seed=0)(x, y)
    n_ours, n_theirs = compare(net, x, y, ours, theirs, 0.12)
    assert n_ours >= 8  # the budget is one where the attack matters


def test_apgdt_as_strong_as_torchattacks(ta, subject):
    net, x, y = subject
    ours = APGDT(net, eps=0.12, steps=30, targets=9, seed=0)(x, y)
    with torch.random.fork_rng():
        theirs = ta.APGDT(net, eps=0.12, steps=30, n_classes=K, seed=0)(x, y)
    compare(net, x, y, ours, theirs, 0.12)


def test_fabt_as_strong_as_torchattacks_and_within_eps(ta, subject):
    net, x, y = subject
    res = FABT(net, eps=0.12, steps=40, targets=9, seed=0).run(x, y)
    with torch.random.fork_rng():
        theirs = ta.FAB(net, eps=0.12, steps=40, multi_targeted=True, n_classes=K, seed=0)(x, y)
    compare(net, x, y, res.adv, theirs, 0.12)
    # a robust sample comes back clean; every returned perturbation fools the model
    changed = (res.adv != x).flatten(1).any(1)
    assert torch.equal(changed, fooled(net, res.adv, y))


def test_autoattack_cascade_as_strong_as_torchattacks(ta, subject):
    """torchattacks' AutoAttack(version="standard") is this MultiAttack at 100 steps and
    5,000 queries; fewer here keep the test short (bench/attacks.py runs the standard one)."""
    net, x, y = subject
    eps, steps, queries = 0.12, 30, 300
    res = AutoAttack(net, eps=eps, steps=steps, n_queries=queries, seed=0).run(x, y)
    with torch.random.fork_rng():
        theirs = ta.MultiAttack([
            ta.APGD(net, eps=eps, steps=steps, loss="ce", seed=0),
            ta.APGDT(net, eps=eps, steps=steps, n_classes=K, seed=0),
            ta.FAB(net, eps=eps, steps=steps, multi_targeted=True, n_classes=K, seed=0),
            ta.Square(net, eps=eps, n_queries=queries, seed=0)])(x, y)
    n_ours, n_theirs = compare(net, x, y, res.adv, theirs, eps)
    # the cascade is at least as strong as its first component alone
    first = APGD(net, eps=eps, steps=steps, seed=0)(x, y)
    assert n_ours >= int(fooled(net, first, y).sum())


def test_autoattack_runs_each_component_on_survivors_only(subject):
    net, x, y = subject
    attack = AutoAttack(net, eps=0.12, steps=10, n_queries=50, seed=0)
    names = [a.name for a in attack.components()]
    assert names == ["apgd", "apgd-t", "fab-t", "square"]  # no step-1 attack on plain logits
    res = attack.run(x, y)
    apgd = APGD(net, eps=0.12, steps=10, seed=0).run(x, y)
    first_fooled = fooled(net, apgd.adv, y)
    # samples APGD-CE fooled cost only its steps; the others paid for the later attacks too
    assert torch.equal(res.steps[first_fooled], apgd.steps[first_fooled])
    assert (res.steps[~first_fooled] > apgd.steps[~first_fooled]).all()


def test_make_attack_knows_the_autoattack_family(subject):
    net, x, y = subject
    for name in ("apgd", "apgd-t", "fab-t", "autoattack"):
        kw = {"n_queries": 20} if name == "autoattack" else {}
        attack = make_attack(name, net, eps=0.05, steps=3, seed=1, **kw)
        assert attack.eps == 0.05 and attack.steps == 3 and attack.seed == 1
        assert (attack(x[:4], y[:4]) - x[:4]).abs().max() <= 0.05 + 1e-6
