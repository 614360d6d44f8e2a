"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016), L2, batched."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Attack, AttackResult, jacobian


class DeepFool(Attack):
    r"""DeepFool, 'DeepFool: a simple and accurate method to fool deep neural networks'
    [https://arxiv.org/abs/1511.04599]. Untargeted, minimal perturbation.

    Distance measure: L2. Each iteration linearises the model at the current point and
    steps to the nearest linearised decision boundary:
    ``l = argmin_{k != y} |f_k - f_y| / ||w_k - w_y||``,
    ``r_i = (|f_l - f_y| + 1e-4) * (w_l - w_y) / ||w_l - w_y||^2``, ``r_tot += r_i``,
    ``x = clip(x0 + (1 + overshoot) * r_tot, 0, 1)``, until the label changes or
    ``max_iter`` iterations — the authors' reference implementation, plus the [0, 1] clip.
    A sample already misclassified is returned unchanged with 0 steps.

    All samples run at once with a per-sample active mask: per iteration one forward
    pass and the Jacobian of all K scores in one batched backward (:func:`jacobian`).

    Differences from torchattacks.DeepFool, which attacks one image at a time: it applies
    the overshoot to each step and clips each iterate (``x <- clip(x + (1+os) r_i)``)
    instead of to the accumulated perturbation, and adds no 1e-4; its results are close
    but not identical.

    Arguments:
        model (nn.Module): returns (N, K) logits/scores.
        overshoot (float): (Default: 0.02)
        max_iter (int): maximum iterations per sample. (Default: 50)
        device: see :class:`~dundi.attacks.base.Attack`.

    There is no eps: DeepFool finds a small L2 perturbation, not one within a budget.

    Shape:
        - images: (N, C, H, W) float32 in [0, 1].
        - labels: (N,) int64 true classes.
        - output: (N, C, H, W); ``run(...).steps`` (N,) iterations each sample used.

    Example::

        >>> res = DeepFool(model, overshoot=0.02, max_iter=50).run(images, labels)
        >>> l2 = (res.adv - images).flatten(1).norm(dim=1)
    """

    name = "deepfool"
    norm = "l2"
    budget_arg = None       # minimal perturbation: unbounded
    steps_arg = "max_iter"

    def __init__(self, model: nn.Module, overshoot: float = 0.02, max_iter: int = 50, device=None):
        super().__init__(model, device)
        self.overshoot = float(overshoot)
        self.max_iter = int(max_iter)

    def _run(self, images: Tensor, labels: Tensor) -> AttackResult:
        n = len(images)
        shape = images.shape[1:]
        x0 = images.reshape(n, -1)
        adv = x0.clone()
        r_tot = torch.zeros_like(x0)
        used = torch.zeros(n, dtype=torch.int64, device=images.device)
        active = torch.arange(n, device=images.device)
        for i in range(self.max_iter):
            if len(active) == 0:
                break
            scores, jac, decided = jacobian(self.model, adv[active].view(-1, *shape))
            y = labels[active]
            if i == 0:
                self._check_labels(scores, y)
            keep = decided == y  # the deciding label (the rule, for DunDi) still right: keep going
            active, scores, jac, y = active[keep], scores[keep], jac[keep], y[keep]
            if len(active) == 0:
                break
            f = scores - scores.gather(1, y[:, None])  # (A, K): f_k - f_y
            w = jac - jac.gather(1, y[:, None, None].expand(-1, 1, jac.shape[2]))  # (A, K, D)
            wn = w.norm(dim=2)
            ratio = f.abs() / (wn + 1e-8)
            ratio.scatter_(1, y[:, None], float("inf"))
            l = ratio.argmin(1)
            fl = f.gather(1, l[:, None])  # (A, 1)
            wl = w.gather(1, l[:, None, None].expand(-1, 1, w.shape[2])).squeeze(1)  # (A, D)
            wln = wn.gather(1, l[:, None])
            r_tot[active] += (fl.abs() + 1e-4) * wl / (wln**2 + 1e-12)
            adv[active] = (x0[active] + (1 + self.overshoot) * r_tot[active]).clamp_(0.0, 1.0)
            used[active] += 1
        return AttackResult(adv.view(n, *shape), used)
