"""APGD: Auto-PGD with the cross-entropy or DLR loss (Croce & Hein, ICML 2020), Linf."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Attack, AttackResult, margin, project_linf, scores_and_labels


def checkpoints(steps: int) -> list[int]:
    """Iterations after which APGD may halve its step size: w_j = ceil(p_j · steps) with
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (the paper's schedule:
    long phases first, then checks every 6% of the budget)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(v * steps) for v in p[1:]} - {0})


def dlr_loss(scores: Tensor, labels: Tensor, target: Tensor | None = None) -> Tensor:
    """Difference-of-logits-ratio loss per sample (larger = closer to fooled), invariant to
    shifting and rescaling the scores, so it does not saturate like cross-entropy.

    Untargeted: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3); targeted: −(z_y − z_t) /
    (z_π1 − (z_π3 + z_π4)/2), π the classes sorted by score. Needs 3 (4) classes."""
    srt = scores.sort(1, descending=True).values
    true = scores.gather(1, labels[:, None]).squeeze(1)
    if target is None:
        other = scores.scatter(1, labels[:, None], float("-inf")).amax(1)
        return -(true - other) / (srt[:, 0] - srt[:, 2] + 1e-12)
    tgt = scores.gather(1, target[:, None]).squeeze(1)
    return -(true - tgt) / (srt[:, 0] - (srt[:, 2] + srt[:, 3]) / 2 + 1e-12)


class APGD(Attack):
    r"""APGD, 'Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks' [https://arxiv.org/abs/2003.01690], the first attack of AutoAttack.

    Distance measure: Linf. PGD without a step size to tune: it starts at 2·eps, keeps a
    momentum of 0.75, and at the checkpoints of :func:`checkpoints` halves the step (and
    resumes from the best point so far) for every sample whose loss rose in fewer than
    ``rho`` of the steps since the last checkpoint, or whose step and best loss both stayed
    the same. Each restart starts at a random point of the ball (uniform, scaled so the
    largest coordinate is eps) and attacks only the samples not fooled yet; a sample leaves
    the batch at the first iterate the model's deciding label gets wrong
    (:func:`~dundi.attacks.base.scores_and_labels`: DunDi's two-step rule for its stand-in).
    Random numbers come from a generator seeded with ``seed`` at each ``run``.

    Arguments:
        model (nn.Module): returns (N, K) logits/scores.
        eps (float): Linf radius. (Default: 0.3)
        steps (int): iterations per restart. (Default: 100, as in AutoAttack)
        restarts (int): random restarts. (Default: 1)
        loss (str): ``"ce"``, ``"dlr"`` or ``"margin"`` (the CW margin, which the evaluation
            uses on DunDi's distance scores unless told otherwise). (Default: "ce")
        rho (float): fraction of rising steps below which the step is halved. (Default: 0.75)
        seed (int): (Default: 0)
        device: see :class:`~dundi.attacks.base.Attack`.

    Shape:
        - images: (N, C, H, W) float32 in [0, 1]; labels: (N,) int64.
        - output: (N, C, H, W); ``run(...).steps`` (N,) gradient steps spent per sample.

    Example::

        >>> adv = APGD(model, eps=0.3, steps=100, loss="ce")(images, labels)
    """

    name = "apgd"
    norm = "linf"
    seeded = True
    losses = ("ce", "dlr", "margin")

    def __init__(self, model: nn.Module, eps: float = 0.3, steps: int = 100, restarts: int = 1,
                 loss: str = "ce", rho: float = 0.75, seed: int = 0, device=None):
        super().__init__(model, device)
        if loss not in self.losses:
            raise ValueError(f"loss must be one of {', '.join(self.losses)}, got {loss!r}")
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {steps} and {restarts}")
        self.eps = float(eps)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.loss = loss
        self.rho = float(rho)
        self.seed = int(seed)

    # ---- what subclasses change ---------------------------------------------------------
    def _loss_and_labels(self, x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-sample loss to climb (graph kept) and the deciding labels at ``x``."""
        scores, decided = scores_and_labels(self.model, x)
        if self.loss == "ce":
            return F.cross_entropy(scores, y, reduction="none"), decided
        if self.loss == "margin":
            return margin(scores, y), decided
        return dlr_loss(scores, y, target), decided

    def _targets(self, images: Tensor, labels: Tensor) -> list[Tensor | None]:
        """One entry per pass over the still-robust samples (APGD-T: one per target class)."""
        return [None]

    # ---- the attack ---------------------------------------------------------------------
    def _grad(self, x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, decided = self._loss_and_labels(x, y, target)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad.detach(), decided

    def _project(self, x: Tensor, x0: Tensor) -> Tensor:
        return project_linf(x, x0, self.eps)

    def _start(self, x0: Tensor, gen) -> Tensor:
        t = gen.rand(x0.shape).mul_(2).sub_(1)
        t = t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *[1] * (x0.dim() - 1))
        return (x0 + self.eps * t).clamp_(0.0, 1.0)

    def _attack(self, x0: Tensor, y: Tensor, target: Tensor | None, gen
                ) -> tuple[Tensor, Tensor, Tensor]:
        """One restart on a batch: (adversarial or best-loss images, fooled flags, steps)."""
        n, shape = len(x0), [-1] + [1] * (x0.dim() - 1)
        out = x0.clone()
        fooled = torch.zeros(n, dtype=torch.bool, device=x0.device)
        used = torch.zeros(n, dtype=torch.int64, device=x0.device)
        act = torch.arange(n, device=x0.device)  # rows of the batch still being attacked
        x = self._start(x0, gen)
        loss, grad, decided = self._grad(x, y, target)
        best_x, best_loss, best_grad = x.clone(), loss.clone(), grad.clone()
        eta = torch.full((n,), 2 * self.eps, device=x0.device)
        rises = torch.zeros(n, device=x0.device)
        cp_loss, cp_reduced = best_loss.clone(), torch.ones(n, dtype=torch.bool, device=x0.device)
        x_prev, last_cp = x.clone(), 0
        marks = set(checkpoints(self.steps))
        xs, ys, ts = x0, y, target
        for it in range(self.steps + 1):
            wrong = decided != ys  # labels at the current iterate x: record and drop the fooled
            if wrong.any():
                out[act[wrong]], fooled[act[wrong]] = x[wrong], True
                keep = ~wrong
                act, xs, ys, x, x_prev, grad, loss = (t[keep] for t in (act, xs, ys, x, x_prev, grad, loss))
                best_x, best_loss, best_grad, eta, rises, cp_loss, cp_reduced = (
                    t[keep] for t in (best_x, best_loss, best_grad, eta, rises, cp_loss, cp_reduced))
                ts = None if ts is None else ts[keep]
            if it == self.steps or len(act) == 0:
                break
            if it in marks:  # halve the step where the loss stalled; resume from the best point
                reduce = (rises < self.rho * (it - last_cp)) | (~cp_reduced & (cp_loss >= best_loss))
                eta[reduce] /= 2
                x[reduce], x_prev[reduce], grad[reduce] = best_x[reduce], best_x[reduce], best_grad[reduce]
                loss[reduce] = best_loss[reduce]
                cp_reduced, cp_loss, rises, last_cp = reduce, best_loss.clone(), torch.zeros_like(rises), it
            e = eta.view(shape)
            z = self._project(x + e * grad.sign(), xs)
            x_new = z if it == 0 else self._project(x + 0.75 * (z - x) + 0.25 * (x - x_prev), xs)
            x_prev, x = x, x_new
            new_loss, grad, decided = self._grad(x, ys, ts)
            used[act] += 1
            rises += (new_loss > loss).float()
            loss = new_loss
            better = loss > best_loss
            best_x[better], best_loss[better], best_grad[better] = x[better], loss[better], grad[better]
        out[act] = best_x  # not fooled: the highest-loss point found
        return out, fooled, used

    def _run(self, images: Tensor, labels: Tensor) -> AttackResult:
        self._check_labels(self._scores(images[:1]), labels[:1])
        gen = self._draws(images.device)
        _, decided = self._decide(images)
        adv = images.clone()
        fooled = decided != labels
        used = torch.zeros(len(images), dtype=torch.int64, device=images.device)
        placed = fooled.clone()
        for target in self._targets(images, labels):
            for _ in range(self.restarts):
                todo = (~fooled).nonzero().squeeze(1)
                if len(todo) == 0:
                    break
                t = None if target is None else target[todo]
                out, ok, steps = self._attack(images[todo], labels[todo], t, gen.take(todo))
                used[todo] += steps
                adv[todo[ok]], fooled[todo[ok]] = out[ok], True
                first = ~ok & ~placed[todo]  # a robust sample keeps its first best-loss point
                adv[todo[first]], placed[todo[first]] = out[first], True
        return AttackResult(adv, used)
