"""One AttackPlan per attack setting, built from the attack's class without building the attack:
its settings hash and budget must be what the built attack holds, for every registered attack,
at its defaults and with settings given; eps has one source (--eps), unbounded attacks say so."""

from __future__ import annotations

import math

import pytest
import torch

from dundi.attacks import ATTACKS
from dundi.errors import DundiError
from dundi.evaluation.config import EvalConfig
from dundi.evaluation.plan import attack_params, attack_settings_id, plan_attack, plan_attacks, plan_shards

GIVEN = {"loss": "margin", "restarts": 2, "alpha": 1, "n_queries": 40, "gamma": 0.05, "max_iter": 3}


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("dataset", ["mnist-10k", "cifar10"])
def test_the_plan_holds_what_the_built_attack_holds(name, given, dataset):
    kw = {k: v for k, v in GIVEN.items() if given and k in ATTACKS[name].options()}
    cfg = EvalConfig(run="r", attacks=[name], threats=["adaptive"], attack_kw=kw, steps=7 if given else None)
    plan = plan_attack(cfg, name, dataset, "adaptive", 0.2 if given else None)
    attack = plan.build(torch.nn.Identity(), seed=5)
    assert plan.settings_id == attack_settings_id(attack), (attack_params(attack), plan.settings)
    if plan.unbounded:
        assert plan.budget is None and math.isinf(attack.budget) and math.isinf(plan.eps_column)
    else:
        assert plan.budget == attack.budget == plan.eps_column


def test_eps_has_one_source():
    cfg = EvalConfig(run="r", attacks=["pgd", "jsma", "deepfool"], threats=["adaptive"], eps=[0.1, 0.3])
    plans = plan_attacks(cfg, "cifar10")  # cifar10's paper eps is 0.05: --eps wins over it
    assert sorted((p.name, p.budget) for p in plans) == [
        ("deepfool", None), ("jsma", ATTACKS["jsma"].options()["gamma"]), ("pgd", 0.1), ("pgd", 0.3)]
    assert {p.name: p.budget for p in plan_attacks(EvalConfig(run="r", attacks=["pgd"]), "cifar10")} == {"pgd": 0.05}
    shards = plan_shards(cfg, 10, plans)
    assert len(shards) == 4 * 1 and {s.eps for s in shards if s.attack == "deepfool"} == {math.inf}
    with pytest.raises(DundiError, match="--eps 0.2"):
        EvalConfig(run="r", native="n", attacks=["pgd"], attack_kw={"eps": 0.2}).validate()


def test_a_device_name_is_checked_before_any_work():
    with pytest.raises(DundiError, match="not a device"):
        EvalConfig(run="r", native="n", device="gpu").validate()
    if not torch.cuda.is_available():
        with pytest.raises(DundiError, match="sees no CUDA GPU"):
            EvalConfig(run="r", native="n", device="cuda:0").validate()
