"""FGSM: one signed-gradient step (Goodfellow, Shlens & Szegedy, ICLR 2015)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Attack, AttackResult, input_grad


class FGSM(Attack):
    r"""Fast Gradient Sign Method, 'Explaining and Harnessing Adversarial Examples'
    [https://arxiv.org/abs/1412.6572].

    Distance measure: Linf.  ``adv = clip(x + eps * sign(grad_x loss(f(x), y)), 0, 1)``.

    Arguments:
        model (nn.Module): returns (N, K) logits/scores.
        eps (float): maximum Linf perturbation. (Default: 0.3, the paper's MNIST setting;
            0.05 for CIFAR-10.)
        loss (str): ``"ce"`` cross-entropy on the scores or ``"margin"``. (Default: "ce")
        device: see :class:`~dundi.attacks.base.Attack`.

    Shape:
        - images: (N, C, H, W) float32 in [0, 1].
        - labels: (N,) int64 true classes in [0, K).
        - output: (N, C, H, W); ``run`` also gives ``steps`` = 1 for every sample.

    Example::

        >>> attack = FGSM(model, eps=0.3)
        >>> adv = attack(images, labels)
    """

    name = "fgsm"
    norm = "linf"
    steps_arg = None  # one step

    def __init__(self, model: nn.Module, eps: float = 0.3, loss: str = "ce", device=None):
        super().__init__(model, device)
        self.eps = float(eps)
        self.loss = loss

    def _run(self, images: Tensor, labels: Tensor) -> AttackResult:
        grad, scores = input_grad(self.model, images, labels, self.loss)
        self._check_labels(scores, labels)
        adv = torch.clamp(images + self.eps * grad.sign(), 0.0, 1.0)
        return AttackResult(adv, torch.ones(len(images), dtype=torch.int64, device=images.device))
