"""APGD-T: targeted APGD with the DLR loss over the top other classes (Croce & Hein 2020)."""

from __future__ import annotations

from torch import Tensor, nn

from .apgd import APGD


class APGDT(APGD):
    r"""APGD-T, the second attack of AutoAttack
    ['Reliable evaluation of adversarial robustness...', https://arxiv.org/abs/2003.01690].

    Distance measure: Linf. For j = 1 … ``targets``, every sample not fooled yet is attacked
    with APGD (:class:`~dundi.attacks.apgd.APGD`, its step-size schedule and restarts)
    climbing the targeted DLR loss −(z_y − z_t)/(z_π1 − (z_π3 + z_π4)/2) towards t = its
    j-th highest-scoring other class at the clean input. Success is any wrong deciding
    label, not only t. Needs at least 4 classes.

    Arguments:
        model (nn.Module): returns (N, K) logits/scores.
        eps (float): Linf radius. (Default: 0.3)
        steps (int): iterations per target and restart. (Default: 100)
        restarts (int): restarts per target. (Default: 1)
        targets (int): number of target classes, capped at K − 1. (Default: 9, AutoAttack's)
        rho, seed, device: as :class:`~dundi.attacks.apgd.APGD`.

    Shape: as :class:`~dundi.attacks.apgd.APGD`; ``steps`` counts every target's steps.

    Example::

        >>> adv = APGDT(model, eps=0.3, steps=100, targets=9)(images, labels)
    """

    name = "apgd-t"
    losses = ("dlr-targeted",)
    fixed_settings = {"loss": "dlr-targeted"}

    def __init__(self, model: nn.Module, eps: float = 0.3, steps: int = 100, restarts: int = 1,
                 targets: int = 9, rho: float = 0.75, seed: int = 0, device=None):
        super().__init__(model, eps, steps, restarts, "dlr-targeted", rho, seed, device)
        if targets < 1:
            raise ValueError(f"targets must be >= 1, got {targets}")
        self.targets = int(targets)

    def _targets(self, images: Tensor, labels: Tensor) -> list[Tensor]:
        scores = self._scores(images)
        if scores.shape[1] < 4:
            raise ValueError(f"APGD-T's DLR loss needs at least 4 classes, the model has {scores.shape[1]}")
        order = scores.scatter(1, labels[:, None], float("-inf")).argsort(1, descending=True)
        return [order[:, j] for j in range(min(self.targets, scores.shape[1] - 1))]
