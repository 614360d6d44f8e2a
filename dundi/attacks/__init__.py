"""Adversarial attacks: one per file, batched, on any model returning (N, K) logits/scores.

Every attack is a class ``Attack(model, **settings)`` with
``attack(images, labels) -> adv`` and ``attack.run(images, labels) -> AttackResult(adv,
steps, target)``; images are float32 (N, C, H, W) in [0, 1], labels the true classes.

The registry holds the attacks of the DunDi paper (with Feinman et al. 2017's settings
for MNIST as defaults) plus PGD, DeepFool and the black-box Square attack for the
adaptive evaluation, and AutoAttack's components (APGD, APGD-T, FAB-T; Square) with their
cascade ``autoattack`` and the step-1 attack on DunDi's rule (``apgd-step1``):

    >>> from dundi.attacks import make_attack
    >>> attack = make_attack("ifgsm-a", model)            # BIM-A, eps 0.3, step 0.01, 50 its
    >>> res = attack.run(images, labels); res.adv, res.steps
    >>> make_attack("pgd", model, eps=0.1, steps=100, restarts=5, loss="margin")

``make_attack(name, model, eps=None, steps=None, seed=0, **kw)`` reads what each attack class
declares about itself (``norm``, ``budget_arg``, ``steps_arg``, ``seeded``; see
:class:`~dundi.attacks.base.Attack`):

- ``eps`` sets the Linf budget of fgsm / ifgsm-a / ifgsm-b / pgd / square. It is
  **ignored** by the minimal-perturbation attacks jsma (L0, bounded by ``gamma``) and
  deepfool (L2, unbounded), which have no budget.
- ``steps`` sets the iterations of ifgsm-a / ifgsm-b / pgd, ``max_iter`` of deepfool and
  ``n_queries`` of square; it is ignored by fgsm (one step) and jsma (bounded by gamma).
- ``seed`` seeds pgd's random starts, jsma's random targets and square; the others are
  deterministic and ignore it.
- ``**kw`` go to the attack's constructor (e.g. ``alpha``, ``restarts``, ``loss``,
  ``theta``, ``gamma``, ``target``, ``overshoot``, ``p_init``).

For CIFAR-10 the paper's settings are eps 0.05 and step 0.005: pass them explicitly
(``eps=0.05, alpha=0.005``).
"""

from __future__ import annotations

from torch import nn

from .apgd import APGD
from .apgdt import APGDT
from .autoattack import AutoAttack
from .base import Attack, AttackResult, eval_mode
from .bim import BIM, BIMA, BIMB
from .checks import AttackCheckWarning, check_black_box_vs_white_box, check_gradients, check_outputs, run_checks
from .deepfool import DeepFool
from .fab import FABT
from .fgsm import FGSM
from .jsma import JSMA
from .pgd import PGD
from .square import Square
from .step1 import APGDStep1

ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "ifgsm-a": BIMA,
    "ifgsm-b": BIMB,
    "pgd": PGD,
    "jsma": JSMA,
    "deepfool": DeepFool,
    "square": Square,
    "apgd": APGD,
    "apgd-t": APGDT,
    "fab-t": FABT,
    "apgd-step1": APGDStep1,
    "autoattack": AutoAttack,
}

# Facts each attack declares on its class (norm, budget_arg, steps_arg, seeded, stand_in_only),
# gathered here for callers that want the table.
ATTACK_NORMS: dict[str, str] = {name: cls.norm for name, cls in ATTACKS.items()}
STEPS_ARG: dict[str, str] = {name: cls.steps_arg for name, cls in ATTACKS.items() if cls.steps_arg}
# Attacks that only make sense on DunDi's two-step stand-in (the adaptive threat model).
STAND_IN_ONLY = tuple(name for name, cls in ATTACKS.items() if cls.stand_in_only)


def make_attack(name: str, model: nn.Module, eps: float | None = None, steps: int | None = None,
                seed: int = 0, **kw) -> Attack:
    """Build the attack ``name`` (a key of :data:`ATTACKS`) on ``model`` with the paper's
    MNIST defaults, overridden by ``eps``, ``steps`` and ``**kw`` (see the module doc)."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}") from None
    if eps is not None and cls.budget_arg == "eps":
        kw["eps"] = eps
    if steps is not None and cls.steps_arg:
        kw[cls.steps_arg] = steps
    if cls.seeded:
        kw["seed"] = seed
    return cls(model, **kw)


__all__ = [
    "ATTACKS", "ATTACK_NORMS", "make_attack", "Attack", "AttackResult", "eval_mode",
    "FGSM", "BIM", "BIMA", "BIMB", "PGD", "JSMA", "DeepFool", "Square", "APGD", "APGDT", "FABT",
    "APGDStep1", "AutoAttack", "STAND_IN_ONLY",
    "AttackCheckWarning", "check_outputs", "check_gradients", "check_black_box_vs_white_box", "run_checks",
]
