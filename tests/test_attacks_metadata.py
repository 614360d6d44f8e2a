"""What each attack declares about itself (norm, budget argument, steps argument, seeded) is
what it does: checked by running every registered attack, not by restating the registry.
And every attack stops on the model's deciding label (DunDi's rule), not on the argmax."""

from __future__ import annotations

import pytest
import torch
from test_attacks import trained
from torch import nn

from dundi.attacks import ATTACKS, STAND_IN_ONLY, make_attack
from dundi.attacks.base import eval_mode, project_linf
from dundi.evaluation.plan import attack_eps, attack_steps

RUNNABLE = sorted(name for name in ATTACKS if name not in STAND_IN_ONLY)
SMALL = {"square": 60, "autoattack": 3, "apgd": 5, "apgd-t": 3, "fab-t": 3, "pgd": 5, "ifgsm-a": 5,
         "ifgsm-b": 5, "deepfool": 5}
FEW_QUERIES = {"autoattack": {"n_queries": 30, "targets": 2}, "apgd-t": {"targets": 2}, "fab-t": {"targets": 2}}


@pytest.fixture(scope="module")
def subject():
    net, x, y = trained()
    return net, x[:6], y[:6]


def build(name: str, net: nn.Module, seed: int = 0, eps: float = 0.1):
    return make_attack(name, net, eps=eps, steps=SMALL.get(name), seed=seed, **FEW_QUERIES.get(name, {}))


def distance(adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    d = (adv - x).flatten(1)
    return {"linf": d.abs().amax(1), "l2": d.norm(dim=1), "l0": (d.abs() > 1e-6).sum(1).float()}[norm]


@pytest.mark.parametrize("name", RUNNABLE)
def test_declared_norm_budget_and_steps_hold_on_the_output(subject, name):
    net, x, y = subject
    attack = build(name, net)
    res = attack.run(x, y)
    cls = type(attack)
    features = x[0].numel()
    if cls.budget_arg == "eps":  # eps reached the attack and bounds its declared norm
        assert attack_eps(attack) == pytest.approx(0.1)
        assert (distance(res.adv, x, cls.norm) <= 0.1 + 1e-6).all()
    elif cls.budget_arg is not None:  # JSMA: a fraction of the pixels
        assert (distance(res.adv, x, cls.norm) <= getattr(attack, cls.budget_arg) * features + 1e-6).all()
    else:  # unbounded: the budget in the rows is inf
        assert attack_eps(attack) == float("inf")
    if cls.steps_arg:  # make_attack's steps set the declared argument, and it bounds the work
        assert attack_steps(attack, features) == SMALL[name]
    if name != "autoattack":  # a cascade's components add up (test_autoattack_reference)
        bound = attack_steps(attack, features) * getattr(attack, "restarts", 1) * getattr(attack, "targets", 1)
        assert int(res.steps.max()) <= bound


@pytest.mark.parametrize("name", RUNNABLE)
def test_declared_seeding(subject, name):
    """A seeded attack repeats itself for one seed; an unseeded one ignores the seed."""
    net, x, y = subject
    a, b = build(name, net, seed=5).run(x, y), build(name, net, seed=5).run(x, y)
    assert torch.equal(a.adv, b.adv) and torch.equal(a.steps, b.steps)
    other = build(name, net, seed=6)
    assert getattr(other, "seed", None) == (6 if type(other).seeded else None)
    if not type(other).seeded:
        assert torch.equal(other.run(x, y).adv, a.adv)


def test_one_linf_projection_for_bim_apgd_and_adversarial_training():
    from dundi.attacks import apgd, bim
    from dundi.training import adversarial

    assert bim.project_linf is project_linf and apgd.project_linf is project_linf
    assert adversarial.project_linf is project_linf and adversarial.eval_mode is eval_mode
    x0 = torch.rand(4, 1, 5, 5)
    x = x0 + torch.randn_like(x0)
    out = project_linf(x.clone(), x0, 0.1)
    assert ((out - x0).abs() <= 0.1 + 1e-7).all() and out.min() >= 0 and out.max() <= 1
    inside = (x - x0).abs().le(0.1) & x.ge(0) & x.le(1)
    assert torch.equal(out[inside], x[inside])  # points already inside are left alone


class RuledNet(nn.Module):
    """A model whose deployed decision is not its argmax (like DunDi's stand-in, whose label
    comes from the two-step rule): the rule answers ``rule(x)``."""

    def __init__(self, net: nn.Module, rule):
        super().__init__()
        self.net, self.rule = net, rule

    def forward(self, x):
        return self.net(x)

    def scores_and_labels(self, x):
        scores = self.net(x)
        return scores, self.rule(scores.detach())


def test_bim_deepfool_and_jsma_stop_on_the_deciding_label(subject):
    """The argmax is right on every clean image, but the rule says otherwise: an attack that
    stops on the rule stops at once; one that looked at the argmax would keep going."""
    net, x, y = subject
    wrong_everywhere = RuledNet(net, lambda s: (s.argmax(1) + 1) % s.shape[1])
    res = make_attack("ifgsm-a", wrong_everywhere, steps=20).run(x, y)
    assert (res.steps == 1).all()  # BIM-A checks iterates from the first on, as Feinman et al.
    res = make_attack("deepfool", wrong_everywhere, steps=20).run(x, y)
    assert (res.steps == 0).all() and torch.equal(res.adv, x)

    def at_target(scores):  # the rule already answers JSMA's (seeded) target class
        return targets
    targets = make_attack("jsma", net, seed=3).run(x, y).target
    res = make_attack("jsma", RuledNet(net, at_target), seed=3).run(x, y)
    assert torch.equal(res.target, targets) and (res.steps == 0).all() and torch.equal(res.adv, x)

    right_everywhere = RuledNet(net, lambda s: y[: len(s)] if len(s) == len(y) else s.argmax(1))
    res = make_attack("deepfool", right_everywhere, steps=4).run(x, y)
    assert (res.steps == 4).all()  # the rule never gives in: DeepFool runs its whole budget
