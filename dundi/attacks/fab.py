"""FAB-T: targeted Fast Adaptive Boundary attack, Linf (Croce & Hein, ICML 2020)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Attack, AttackResult, scores_and_labels


def min_linf_to_hyperplane(w: Tensor, b: Tensor, lower: Tensor, upper: Tensor, iters: int = 30) -> Tensor:
    """Smallest-Linf δ (N, D) with w·δ = b inside the box lower ≤ δ ≤ upper (lower ≤ 0 ≤ upper).

    δ(t) = clip(t · sign(w·b), lower, upper) moves w·δ monotonically towards b as t grows,
    so the smallest feasible t is found by bisection on [0, max box side]; where even the
    whole box falls short of the hyperplane, the box corner nearest to it is returned.
    w, lower, upper: (N, D); b: (N,)."""
    direction = torch.sign(w) * torch.sign(b)[:, None]

    def reach(t: Tensor) -> Tensor:
        d = torch.max(torch.min(direction * t[:, None], upper), lower)
        return d, (w * d).sum(1) * torch.sign(b)

    lo = torch.zeros_like(b)
    hi = torch.max(upper.amax(1), (-lower).amax(1)).clamp_min(1e-12)
    target = b.abs()
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = reach(mid)[1] >= target
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    return reach(hi)[0]


class FABT(Attack):
    r"""FAB-T, the third attack of AutoAttack: 'Minimally distorted adversarial examples
    with a fast adaptive boundary attack' [https://arxiv.org/abs/1907.02044].

    Distance measure: Linf. For each target t (the j-th highest-scoring other class at the
    clean input, j = 1 … ``targets``) and each sample not fooled yet: linearise
    f = z_t − z_y at the iterate x_i, project both x_i and the clean x onto the hyperplane
    f ≈ 0 inside the [0, 1] box (:func:`min_linf_to_hyperplane`), and step to the convex combination
    (1 − α)(x_i + η δ_i) + α(x + η δ_x) with α = min(‖δ_i‖/(‖δ_i‖ + ‖δ_x‖), ``alpha_max``),
    biased towards the clean image so the perturbation stays small. When the deciding label
    (:func:`~dundi.attacks.base.scores_and_labels`) turns wrong, the point is kept if it is
    the closest adversarial so far and the iterate steps back towards x by ``beta``. The
    first restart starts at x, later ones at a random point within half the best distance.
    A sample stops once it has an adversarial within ``eps``; only those are returned (the
    others get their clean image back), as AutoAttack counts FAB.

    Arguments:
        model (nn.Module): returns (N, K) logits/scores.
        eps (float): Linf budget an adversarial must meet. (Default: 0.3)
        steps (int): iterations per target and restart. (Default: 100)
        restarts (int): (Default: 1)
        targets (int): target classes, capped at K − 1. (Default: 9)
        alpha_max (float), eta (float), beta (float): (Defaults: 0.1, 1.05, 0.9, the paper's)
        seed (int): random restarts. (Default: 0)
        device: see :class:`~dundi.attacks.base.Attack`.

    Shape:
        - images: (N, C, H, W) float32 in [0, 1]; labels: (N,) int64.
        - output: (N, C, H, W); ``run(...).steps`` (N,) gradient steps spent per sample.

    Example::

        >>> adv = FABT(model, eps=0.3, steps=100, targets=9)(images, labels)
    """

    name = "fab-t"
    norm = "linf"
    seeded = True

    def __init__(self, model: nn.Module, eps: float = 0.3, steps: int = 100, restarts: int = 1,
                 targets: int = 9, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 seed: int = 0, device=None):
        super().__init__(model, device)
        if steps < 1 or restarts < 1 or targets < 1:
            raise ValueError(f"steps, restarts and targets must be >= 1, got {steps}, {restarts}, {targets}")
        self.eps = float(eps)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.targets = int(targets)
        self.alpha_max = float(alpha_max)
        self.eta = float(eta)
        self.beta = float(beta)
        self.seed = int(seed)

    def _linearise(self, x: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """f = z_t − z_y at x, its input gradient (N, D), and the deciding labels."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            scores, decided = scores_and_labels(self.model, x)
            f = scores.gather(1, t[:, None]).squeeze(1) - scores.gather(1, y[:, None]).squeeze(1)
            (g,) = torch.autograd.grad(f.sum(), x)
        return f.detach(), g.flatten(1), decided

    def _attack(self, x0: Tensor, y: Tensor, t: Tensor, start: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One restart for one target: (closest adversarial or x0, its Linf norm (inf if
        none), steps used)."""
        n, shape = len(x0), x0.shape
        flat0 = x0.flatten(1)
        best = x0.clone()
        best_norm = torch.full((n,), float("inf"), device=x0.device)
        used = torch.zeros(n, dtype=torch.int64, device=x0.device)
        act = torch.arange(n, device=x0.device)
        x = start.flatten(1).clone()
        for _ in range(self.steps):
            f, g, decided = self._linearise(x.view(-1, *shape[1:]), y[act], t[act])
            used[act] += 1
            wrong = decided != y[act]
            if wrong.any():  # the current iterate is adversarial: keep it if closest, step back
                norm = (x - flat0[act]).abs().amax(1)
                closer = wrong & (norm < best_norm[act])
                best.view(n, -1)[act[closer]] = x[closer]
                best_norm[act[closer]] = norm[closer]
                x[wrong] = (1 - self.beta) * flat0[act][wrong] + self.beta * x[wrong]
            keep = best_norm[act] > self.eps  # done once within the budget
            act, x, f, g = act[keep], x[keep], f[keep], g[keep]
            if len(act) == 0:
                break
            x_orig = flat0[act]
            both = min_linf_to_hyperplane(torch.cat([g, g]), torch.cat([-f, -f - (g * (x_orig - x)).sum(1)]),
                                torch.cat([-x, -x_orig]), torch.cat([1 - x, 1 - x_orig]))
            d_x, d_orig = both[: len(act)], both[len(act):]
            a_x, a_orig = d_x.abs().amax(1), d_orig.abs().amax(1)
            alpha = (a_x / (a_x + a_orig).clamp_min(1e-12)).clamp(0, self.alpha_max)[:, None]
            x = ((1 - alpha) * (x + self.eta * d_x) + alpha * (x_orig + self.eta * d_orig)).clamp(0, 1)
        if len(act):  # the last iterate has not been checked yet
            _, decided = self._decide(x.view(-1, *shape[1:]))
            norm = (x - flat0[act]).abs().amax(1)
            closer = (decided != y[act]) & (norm < best_norm[act])
            best.view(n, -1)[act[closer]] = x[closer]
            best_norm[act[closer]] = norm[closer]
        return best, best_norm, used

    def _run(self, images: Tensor, labels: Tensor) -> AttackResult:
        scores, decided = self._decide(images)
        self._check_labels(scores, labels)
        gen = self._draws(images.device)
        order = scores.scatter(1, labels[:, None], float("-inf")).argsort(1, descending=True)
        adv = images.clone()
        norm = torch.where(decided != labels, 0.0, float("inf")).to(images.device)
        used = torch.zeros(len(images), dtype=torch.int64, device=images.device)
        for j in range(min(self.targets, scores.shape[1] - 1)):
            for r in range(self.restarts):
                todo = (norm > self.eps).nonzero().squeeze(1)
                if len(todo) == 0:
                    break
                x0 = images[todo]
                start = x0
                if r > 0:  # random start within half the best distance (or eps)
                    u = gen.take(todo).rand(x0.shape).mul_(2).sub_(1)
                    u = u / u.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    radius = norm[todo].clamp(max=self.eps).view(-1, 1, 1, 1) / 2
                    start = (x0 + radius * u).clamp(0, 1)
                out, out_norm, steps = self._attack(x0, labels[todo], order[todo, j], start)
                used[todo] += steps
                closer = out_norm < norm[todo]
                adv[todo[closer]], norm[todo[closer]] = out[closer], out_norm[closer]
        beyond = norm > self.eps  # an adversarial outside the budget does not count
        adv[beyond] = images[beyond]
        return AttackResult(adv, used)
