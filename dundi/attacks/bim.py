"""BIM / iterative FGSM (Kurakin, Goodfellow & Bengio, 2016) and its BIM-A / BIM-B variants."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Attack, AttackResult, grad_and_decision, input_grad, project_linf


class BIM(Attack):
    r"""Basic Iterative Method (iterative FGSM), 'Adversarial Examples in the Physical
    World' [https://arxiv.org/abs/1607.02533].

    Distance measure: Linf. Starting from the clean image, ``steps`` times:
    ``x <- clip_{x0, eps}(x + alpha * sign(grad_x CE(f(x), y)))``, where the clip projects
    onto the Linf eps-ball around the clean image ``x0`` and onto [0, 1] after each step.

    Two variants, as in Feinman et al. 2017 whose code produced the DunDi paper's samples:

    - **BIM-B** (``early_stop=False``, the paper's "iFGSM-b"): all ``steps`` iterations.
      Step for step identical to ``torchattacks.BIM`` (which uses the batch-mean CE; we
      use the sum, which has the same sign and keeps samples independent of the batch).
    - **BIM-A** (``early_stop=True``, "iFGSM-a"): each sample stops at its first
      misclassified iterate. As in Feinman et al.'s code, iterates 1..steps are checked
      (not the clean image itself), so ``steps_used >= 1``; a sample never misclassified
      runs all ``steps`` iterations and returns the last iterate, like BIM-B.

    Arguments:
        model (nn.Module): returns (N, K) logits/scores.
        eps (float): maximum Linf perturbation. (Default: 0.3, paper MNIST; 0.05 CIFAR-10)
        alpha (float): step size. (Default: 0.01, paper MNIST; 0.005 CIFAR-10)
        steps (int): number of iterations. (Default: 50)
        early_stop (bool): BIM-A if True, BIM-B if False. (Default: False)
        loss (str): ``"ce"`` or ``"margin"``. (Default: "ce")
        device: see :class:`~dundi.attacks.base.Attack`.

    Shape:
        - images: (N, C, H, W) float32 in [0, 1].
        - labels: (N,) int64 true classes.
        - output: (N, C, H, W); ``run(...).steps`` (N,) iterations each sample used.

    Example::

        >>> adv = BIM(model, eps=0.3, alpha=0.01, steps=50)(images, labels)     # BIM-B
        >>> res = BIMA(model).run(images, labels); res.adv, res.steps           # BIM-A
    """

    name = "bim"
    norm = "linf"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.3,
        alpha: float = 0.01,
        steps: int = 50,
        early_stop: bool = False,
        loss: str = "ce",
        device=None,
    ):
        super().__init__(model, device)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.eps = float(eps)
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.early_stop = bool(early_stop)
        self.loss = loss

    def _run(self, images: Tensor, labels: Tensor) -> AttackResult:
        n = len(images)
        adv = images.clone()
        used = torch.zeros(n, dtype=torch.int64, device=images.device)
        active = torch.arange(n, device=images.device)
        for i in range(self.steps):
            if len(active) == 0:
                break
            if self.early_stop:  # the deciding label (the rule, for DunDi) stops a sample
                grad, scores, decided = grad_and_decision(self.model, adv[active], labels[active], self.loss)
            else:
                grad, scores = input_grad(self.model, adv[active], labels[active], self.loss)
            if i == 0:
                self._check_labels(scores, labels[active])
            if self.early_stop and i > 0:
                # The forward pass for this step also tells which current iterates are
                # already misclassified: freeze those (their gradient goes unused).
                keep = decided == labels[active]
                active, grad = active[keep], grad[keep]
                if len(active) == 0:
                    break
            step = adv[active] + self.alpha * grad.sign()
            adv[active] = project_linf(step, images[active], self.eps)
            used[active] += 1
        return AttackResult(adv, used)


class BIMA(BIM):
    """BIM-A ("iFGSM-a"): :class:`BIM` with ``early_stop=True``. Same arguments."""

    name = "ifgsm-a"
    fixed_settings = {"early_stop": True}

    def __init__(self, model: nn.Module, eps: float = 0.3, alpha: float = 0.01, steps: int = 50,
                 loss: str = "ce", device=None):
        super().__init__(model, eps, alpha, steps, early_stop=True, loss=loss, device=device)


class BIMB(BIM):
    """BIM-B ("iFGSM-b"): :class:`BIM` with ``early_stop=False``. Same arguments."""

    name = "ifgsm-b"
    fixed_settings = {"early_stop": False}

    def __init__(self, model: nn.Module, eps: float = 0.3, alpha: float = 0.01, steps: int = 50,
                 loss: str = "ce", device=None):
        super().__init__(model, eps, alpha, steps, early_stop=False, loss=loss, device=device)
