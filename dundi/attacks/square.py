"""Square Attack (Andriushchenko et al., ECCV 2020), Linf, score-based black box."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Attack, AttackResult, margin, scores_and_labels


def p_selection(p_init: float, it: int, n_queries: int) -> float:
    """The authors' piecewise-constant schedule of the fraction of pixels changed,
    rescaled to the query budget (as if it were 10,000)."""
    it = int(it / n_queries * 10000)
    for upper, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                       (6000, 128), (8000, 256)):
        if it <= upper:
            return p_init / div
    return p_init / 512


class Square(Attack):
    r"""Square Attack, 'Square Attack: a query-efficient black-box adversarial attack via
    random search' [https://arxiv.org/abs/1912.00049].

    Distance measure: Linf. Uses only the model's scores — it runs under
    ``torch.no_grad`` and never calls backward — so it is unaffected by gradient masking:
    if it succeeds where gradient attacks fail, the gradients are lying
    (:func:`~dundi.attacks.checks.check_black_box_vs_white_box`).

    Start: vertical stripes of ±eps. Each query, every not-yet-fooled sample gets a
    random square window (side ``round(sqrt(p * H*W))``, p from the schedule
    :func:`p_selection` starting at ``p_init``) set to a random ±eps per channel; the
    proposal is kept if it lowers the loss or misclassifies. A sample stops at its first
    misclassification. Windows are drawn per sample, as in the authors' code (torchattacks
    draws one window for the whole batch). Random numbers come from a generator seeded
    with ``seed`` at each ``run``.

    Arguments:
        model (nn.Module): returns (N, K) logits/scores.
        eps (float): maximum Linf perturbation. (Default: 0.3, the paper's MNIST setting.)
        n_queries (int): query budget per sample, the initial query included. (Default: 1000)
        p_init (float): initial fraction of pixels in a window. (Default: 0.8)
        loss (str): ``"margin"`` (true score minus best other) or ``"ce"``. (Default: "margin")
        seed (int): (Default: 0)
        device: see :class:`~dundi.attacks.base.Attack`.

    Shape:
        - images: (N, C, H, W) float32 in [0, 1].
        - labels: (N,) int64 true classes.
        - output: (N, C, H, W); ``run(...).steps`` (N,) model queries spent per sample.

    Example::

        >>> res = Square(model, eps=0.3, n_queries=1000, seed=0).run(images, labels)
    """

    name = "square"
    norm = "linf"
    steps_arg = "n_queries"
    seeded = True

    def __init__(self, model: nn.Module, eps: float = 0.3, n_queries: int = 1000, p_init: float = 0.8,
                 loss: str = "margin", seed: int = 0, device=None):
        super().__init__(model, device)
        if loss not in ("margin", "ce"):
            raise ValueError(f"loss must be 'margin' or 'ce', got {loss!r}")
        if n_queries < 1:
            raise ValueError(f"n_queries must be >= 1, got {n_queries}")
        self.eps = float(eps)
        self.n_queries = int(n_queries)
        self.p_init = float(p_init)
        self.loss = loss
        self.seed = int(seed)

    def _margin_and_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(true score - best other score, loss to minimise), both (N,). The margin is
        forced to <= 0 exactly when the model's deciding label (the two-step rule for
        DunDi's stand-in, else the argmax) is wrong: that is what stops a sample."""
        scores, decided = scores_and_labels(self.model, x)
        m = -margin(scores, y)
        wrong = decided != y
        m = torch.where(wrong, m.clamp(max=0.0), m.clamp(min=torch.finfo(m.dtype).tiny))
        if self.loss == "margin":
            return m, m
        return m, -F.cross_entropy(scores, y, reduction="none")

    @staticmethod
    def _signs(shape, gen) -> Tensor:
        return gen.randint(0, 2, shape).float().mul_(2).sub_(1)

    def _propose(self, x: Tensor, xb: Tensor, it: int, gen) -> Tensor:
        """One proposal per row: a random square window of ``x`` set to ±eps per channel,
        the rest of the current best ``xb``. ``gen``: the rows' draws
        (:mod:`dundi.attacks.draws`)."""
        a, c, h, w = x.shape
        dev = x.device
        p = p_selection(self.p_init, it, self.n_queries)
        s = min(max(int(round(math.sqrt(p * h * w))), 1), min(h, w) - 1)
        vh = gen.randint(0, h - s + 1, (a, 1, 1, 1))
        vw = gen.randint(0, w - s + 1, (a, 1, 1, 1))
        rows = torch.arange(h, device=dev).view(1, 1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, 1, w)
        window = ((rows >= vh) & (rows < vh + s)) & ((cols >= vw) & (cols < vw + s))
        x_new = torch.where(window, x + self.eps * self._signs((a, c, 1, 1), gen), xb).clamp_(0.0, 1.0)
        # The authors redraw a window's signs while the proposal leaves the image unchanged
        # (it would waste a query); a few vectorised redraws do the same.
        for _ in range(5):
            same = ((x_new - xb).abs_().flatten(1).amax(1) < 1e-7).nonzero().squeeze(1)
            if len(same) == 0:
                break
            redraw = x[same] + self.eps * self._signs((len(same), c, 1, 1), gen.take(same))
            x_new[same] = torch.where(window[same], redraw, xb[same]).clamp_(0.0, 1.0)
        return x_new

    @torch.no_grad()
    def _run(self, images: Tensor, labels: Tensor) -> AttackResult:
        n, c, h, w = images.shape
        dev = images.device
        gen = self._draws(dev)
        self._check_labels(self.model(images[:1]), labels[:1])

        best = (images + self.eps * self._signs((n, c, 1, w), gen)).clamp_(0.0, 1.0)
        margin_min, loss_min = self._margin_and_loss(best, labels)
        used = torch.ones(n, dtype=torch.int64, device=dev)
        # The rows still being attacked, compacted only when some of them are fooled: the
        # per-query work is then the proposal and one forward pass, not re-gathering the batch.
        act = (margin_min > 0).nonzero().squeeze(1)
        x, xb, y, mm, lm = images[act], best[act], labels[act], margin_min[act], loss_min[act]
        for it in range(self.n_queries - 1):
            if len(act) == 0:
                break
            x_new = self._propose(x, xb, it, gen.take(act))
            m, lss = self._margin_and_loss(x_new, y)
            better = (lss < lm) | (m <= 0)
            xb = torch.where(better.view(-1, 1, 1, 1), x_new, xb)
            mm, lm = torch.where(better, m, mm), torch.where(better, lss, lm)
            used[act] += 1
            done = mm <= 0
            if done.any():
                best[act[done]] = xb[done]
                keep = ~done
                act, x, xb, y, mm, lm = act[keep], x[keep], xb[keep], y[keep], mm[keep], lm[keep]
        best[act] = xb
        return AttackResult(best, used)
