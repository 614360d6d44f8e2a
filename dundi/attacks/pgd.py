"""PGD with random start and restarts (Madry et al., ICLR 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Attack, AttackResult, input_grad, loss_per_sample


def _norms(x: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped (N, 1, 1, 1) for broadcasting."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


class PGD(Attack):
    r"""Projected Gradient Descent, 'Towards Deep Learning Models Resistant to Adversarial
    Attacks' [https://arxiv.org/abs/1706.06083].

    Distance measure: Linf (default) or L2. Each restart starts at a uniformly random
    point of the eps-ball (``random_start=True``), takes ``steps`` steps of size ``alpha``
    (signed gradient for Linf, L2-normalised gradient for L2) on the loss, projecting
    onto the eps-ball and [0, 1] after each step. Restarts after the first only attack
    the samples not fooled yet; per sample the result is the first misclassified
    restart, else the restart with the highest loss (worst case over restarts). "Fooled"
    is the model's deciding label (:func:`~dundi.attacks.base.scores_and_labels`: DunDi's
    two-step rule for its adaptive stand-in), else the argmax.

    Linf with ``restarts=1`` and ``loss="ce"`` is step for step ``torchattacks.PGD``; its
    random start draws ``uniform_(-eps, eps)`` from torch's global generator, ours from a
    ``torch.Generator`` seeded with ``seed`` at each ``run`` — the same numbers as
    torchattacks after ``torch.manual_seed(seed)`` on CPU. Our runs never touch the global
    RNG, so they are reproducible on their own.

    Arguments:
        model (nn.Module): returns (N, K) logits/scores.
        eps (float): radius of the ball. (Default: 0.3, the paper's MNIST Linf setting.)
        alpha (float): step size. (Default: 0.01)
        steps (int): steps per restart. (Default: 50)
        restarts (int): number of random restarts. (Default: 1)
        random_start (bool): start at a random point of the ball. (Default: True)
        loss (str): ``"ce"`` cross-entropy or ``"margin"``, the CW logit margin
            ``max_{j != y} z_j - z_y``; margin does not saturate and suits non-softmax
            scores. (Default: "ce")
        norm (str): ``"linf"`` or ``"l2"``. eps/alpha defaults are Linf values. (Default: "linf")
        seed (int): seed of the random starts. (Default: 0)
        device: see :class:`~dundi.attacks.base.Attack`.

    Shape:
        - images: (N, C, H, W) float32 in [0, 1].
        - labels: (N,) int64 true classes.
        - output: (N, C, H, W); ``run(...).steps`` (N,) gradient steps spent on each sample
          over all restarts.

    Example::

        >>> attack = PGD(model, eps=0.3, alpha=0.01, steps=50, restarts=5, loss="margin")
        >>> adv = attack(images, labels)
    """

    name = "pgd"
    norm = "linf"  # the class's default; an instance built with norm="l2" says so itself
    seeded = True

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.3,
        alpha: float = 0.01,
        steps: int = 50,
        restarts: int = 1,
        random_start: bool = True,
        loss: str = "ce",
        norm: str = "linf",
        seed: int = 0,
        device=None,
    ):
        super().__init__(model, device)
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if loss not in ("ce", "margin"):
            raise ValueError(f"loss must be 'ce' or 'margin', got {loss!r}")
        if restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        self.eps = float(eps)
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.random_start = bool(random_start)
        self.loss = loss
        self.norm = norm
        self.seed = int(seed)

    def _start(self, images: Tensor, gen) -> Tensor:
        if not self.random_start:
            return images.clone()
        if self.norm == "linf":
            delta = gen.uniform(images.shape, -self.eps, self.eps)
        else:  # direction uniform on the sphere, radius uniform in [0, eps] (as torchattacks.PGDL2)
            delta = gen.normal(images.shape)
            r = gen.uniform((len(images), 1, 1, 1), 0, 1)
            delta = delta * (r / (_norms(delta) + 1e-12) * self.eps)
        return torch.clamp(images + delta, 0.0, 1.0)

    def _project(self, adv: Tensor, images: Tensor) -> Tensor:
        # Clips the step (images + clamp(adv - images)), as torchattacks.PGD does, not adv itself
        # as base.project_linf (torchattacks.BIM's arithmetic): the two differ by one ulp at rare
        # float ties (images 2**-27 + 2**-10, adv 0.125 + 2**-26 + 2**-10), and each attack
        # agrees exactly with its reference (tests/test_attacks_reference.py).
        delta = adv - images
        if self.norm == "linf":
            delta = torch.clamp(delta, -self.eps, self.eps)
        else:
            delta = delta * torch.clamp(self.eps / (_norms(delta) + 1e-12), max=1.0)
        return torch.clamp(images + delta, 0.0, 1.0)

    def _one_restart(self, images: Tensor, labels: Tensor, gen) -> Tensor:
        adv = self._start(images, gen)
        for _ in range(self.steps):
            grad, _ = input_grad(self.model, adv, labels, self.loss)
            if self.norm == "linf":
                adv = adv + self.alpha * grad.sign()
            else:
                adv = adv + self.alpha * grad / (_norms(grad) + 1e-12)
            adv = self._project(adv, images)
        return adv

    def _run(self, images: Tensor, labels: Tensor) -> AttackResult:
        n = len(images)
        self._check_labels(self._scores(images[:1]), labels[:1])
        gen = self._draws(images.device)
        best = images.clone()
        best_loss = torch.full((n,), float("-inf"), device=images.device)
        fooled = torch.zeros(n, dtype=torch.bool, device=images.device)
        used = torch.zeros(n, dtype=torch.int64, device=images.device)
        for _ in range(self.restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            adv = self._one_restart(images[todo], labels[todo], gen.take(todo))
            used[todo] += self.steps
            scores, decided = self._decide(adv)
            lss = loss_per_sample(scores, labels[todo], self.loss)
            wrong = decided != labels[todo]  # the model's own decision (the rule, for DunDi)
            better = wrong | (lss > best_loss[todo])
            upd = todo[better]
            best[upd], best_loss[upd], fooled[upd] = adv[better], lss[better], wrong[better]
        return AttackResult(best, used)
