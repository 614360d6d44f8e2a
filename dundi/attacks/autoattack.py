"""AutoAttack's standard Linf cascade (Croce & Hein 2020), on DunDi's deployed rule too."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .apgd import APGD
from .apgdt import APGDT
from .base import Attack, AttackResult
from .fab import FABT
from .square import Square
from .step1 import APGDStep1


class AutoAttack(Attack):
    r"""AutoAttack, 'Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks' [https://arxiv.org/abs/2003.01690], version "standard".

    Distance measure: Linf. Runs APGD-CE, APGD-T (DLR, ``targets`` other classes), FAB-T
    (``targets`` classes) and Square (``n_queries`` queries) one after the other, each on
    the samples every earlier attack left correctly classified, and keeps per sample the
    first adversarial found: robust accuracy is the worst case over the four. On DunDi's
    adaptive stand-in (:class:`dundi.rule.reference.TwoStepScorer` with k below the number of
    classes) APGD on step 1 (:class:`~dundi.attacks.step1.APGDStep1`) joins after APGD-CE.
    "Correct" is always the model's deciding label (the two-step rule for DunDi). Samples
    no attack fools keep APGD-CE's highest-loss point.

    Arguments:
        model (nn.Module): returns (N, K) logits/scores.
        eps (float): Linf radius. (Default: 0.3)
        steps (int): iterations of APGD-CE, APGD-T (per target) and FAB-T (per target).
            (Default: 100)
        targets (int): target classes of APGD-T and FAB-T, capped at K − 1. (Default: 9)
        n_queries (int): Square's query budget. (Default: 5000)
        step1 (bool): include the step-1 attack where it applies. (Default: True)
        seed (int): each component gets ``seed`` + its position. (Default: 0)
        device: see :class:`~dundi.attacks.base.Attack`.

    Shape:
        - images: (N, C, H, W) float32 in [0, 1]; labels: (N,) int64.
        - output: (N, C, H, W); ``run(...).steps`` (N,) gradient steps and queries spent.

    Example::

        >>> adv = AutoAttack(model, eps=0.3)(images, labels)
    """

    name = "autoattack"
    norm = "linf"
    seeded = True

    def __init__(self, model: nn.Module, eps: float = 0.3, steps: int = 100, targets: int = 9,
                 n_queries: int = 5000, step1: bool = True, seed: int = 0, device=None):
        super().__init__(model, device)
        if steps < 1 or targets < 1 or n_queries < 1:
            raise ValueError(f"steps, targets and n_queries must be >= 1, got {steps}, {targets}, {n_queries}")
        self.eps = float(eps)
        self.steps = int(steps)
        self.targets = int(targets)
        self.n_queries = int(n_queries)
        self.step1 = bool(step1)
        self.seed = int(seed)

    def components(self) -> list[Attack]:
        """The cascade, in order."""
        m, e, s, seed = self.model, self.eps, self.steps, self.seed
        out: list[Attack] = [APGD(m, e, s, loss="ce", seed=seed, device=self.device)]
        if self.step1 and APGDStep1.applies(m):
            out.append(APGDStep1(m, e, s, seed=seed + 1, device=self.device))
        out += [APGDT(m, e, s, targets=self.targets, seed=seed + 2, device=self.device),
                FABT(m, e, s, targets=self.targets, seed=seed + 3, device=self.device),
                Square(m, e, n_queries=self.n_queries, seed=seed + 4, device=self.device)]
        return out

    def _run(self, images: Tensor, labels: Tensor) -> AttackResult:
        _, decided = self._decide(images)
        fooled = decided != labels
        adv = images.clone()
        used = torch.zeros(len(images), dtype=torch.int64, device=images.device)
        for i, attack in enumerate(self.components()):
            todo = (~fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            keys = None if self._keys is None else self._keys[todo.cpu()]
            res = attack.run(images[todo], labels[todo], keys)
            _, decided = self._decide(res.adv)
            ok = decided != labels[todo]
            used[todo] += res.steps
            keep = ok if i else torch.ones_like(ok)  # robust samples keep APGD-CE's point
            adv[todo[keep]] = res.adv[keep]
            fooled[todo[ok]] = True
        return AttackResult(adv, used)
