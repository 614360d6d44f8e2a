"""JSMA: the Jacobian-based Saliency Map Attack (Papernot et al., EuroS&P 2016), batched."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Attack, AttackResult, scores_and_labels

# Pair-saliency tensors are computed in chunks of at most this many float32 elements
# (16 MiB each), so memory stays flat whatever the batch size.
_PAIR_CHUNK = 1 << 22


def _exclusive_cummax(x: Tensor) -> Tensor:
    """Per row, the max of the entries strictly before each position (-inf at 0)."""
    head = x.new_full((x.shape[0], 1), float("-inf"))
    return torch.cat([head, torch.cummax(x, 1).values[:, :-1]], 1)


def best_pixel_pairs(a: Tensor, c: Tensor, domain: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The most salient admissible pixel pair of each sample, exactly, in O(D log D + s^2)
    per sample instead of O(D^2), with s a small number of candidate pixels.

    The saliency of a pair is ``f(p, q) = relu(a_p + a_q) * relu(c_p + c_q)`` over pairs
    p != q of pixels in ``domain``. (With a the target-class derivative and c minus the
    summed other-class derivatives this is Papernot et al.'s eq. 10 for increasing
    features: alpha > 0, beta < 0, score alpha * |beta|; a pair violating a condition
    scores 0.)

    Why few candidates suffice: f is symmetric and non-decreasing in (a_q, c_q), so
    either pixel of a pair can be swapped for any pixel that weakly dominates it (a and
    c both >=) without lowering the score. Sort the pixels by a descending; the
    first Pareto layer F1 holds the pixels whose c beats every earlier one, F2 the same
    among the rest, S = F1 | F2. Every pixel outside S is weakly dominated by one pixel
    of F2 and, through it, one of F1: two distinct members of S, so at least one differs
    from the other pixel of the pair. Swapping q, then p, into S this way gives a best
    pair inside S, so only the pairs of S are scored. S is usually a few dozen pixels
    (for the softmax "probs" space, where c == a, exactly 2).

    a, c: (N, D) float; domain: (N, D) bool. Returns (score, p, q), each (N,); a score
    of 0 means that no admissible pair exists.
    """
    n, d = a.shape
    ninf = float("-inf")
    a = a.masked_fill(~domain, ninf)  # any pair with a pixel outside the domain scores 0
    c_front = c.masked_fill(~domain, ninf)
    c = c.masked_fill(~domain, 0.0)

    # Order by a descending and peel two layers. (Ties in a may come in any order: a
    # pixel then may land in S without being maximal, which only makes S larger.)
    order = torch.sort(a, dim=1, descending=True).indices
    cs = c_front.gather(1, order)
    f1 = cs > _exclusive_cummax(cs)
    rest = cs.masked_fill(f1, ninf)
    f2 = ~f1 & (rest > _exclusive_cummax(rest))
    front = torch.zeros_like(domain).scatter_(1, order, f1 | f2) & domain

    score = a.new_zeros(n)
    p = torch.zeros(n, dtype=torch.int64, device=a.device)
    q = torch.ones(n, dtype=torch.int64, device=a.device)
    # Rows are grouped by candidate count (rounded up to a power of two), so one row with
    # many candidates does not make every row pay for them.
    count = front.sum(1).clamp_(min=2)
    size = torch.pow(2, torch.ceil(torch.log2(count.double()))).long().clamp_(max=d)
    for m in size.unique().tolist():
        rows_all = (size == m).nonzero().squeeze(1)
        step = max(1, _PAIR_CHUNK // (m * m))
        for i in range(0, len(rows_all), step):
            rows = rows_all[i:i + step]
            cand = front[rows].to(torch.uint8).topk(m, 1).indices  # (R, m): every candidate of these rows
            ac, cc = a[rows].gather(1, cand), c[rows].gather(1, cand)
            s = (ac[:, :, None] + ac[:, None, :]).clamp_(min=0)
            s.mul_((cc[:, :, None] + cc[:, None, :]).clamp_(min=0))
            s.diagonal(dim1=1, dim2=2).zero_()  # a pixel does not pair with itself
            best, idx = s.flatten(1).max(1)
            i_, j_ = torch.div(idx, m, rounding_mode="floor"), idx % m
            score[rows] = best
            p[rows] = cand.gather(1, i_[:, None]).squeeze(1)
            q[rows] = cand.gather(1, j_[:, None]).squeeze(1)
    return score, p, q


class JSMA(Attack):
    r"""Jacobian-based Saliency Map Attack, 'The Limitations of Deep Learning in Adversarial
    Settings' [https://arxiv.org/abs/1511.07528]. Targeted.

    Distance measure: L0. Each iteration changes the two input features (pixels, per
    channel) with the highest pair saliency towards the target class by ``theta``
    (clipped to [0, 1]) and removes them from the search domain. A sample stops when it
    is classified as its target, when ``floor(gamma * C*H*W / 2)`` pairs have been changed
    (so at most ``gamma * C*H*W`` features change), when fewer than two pixels remain in
    its domain, or when no pair is admissible (no pair raises the target score while
    lowering the others: the attack failed for that sample). The initial domain holds the
    features that can still move (``x < 1`` if theta > 0, ``x > 0`` if theta < 0), as in
    cleverhans' JSMA that Feinman et al. (the paper's attack code) used.

    All samples of a batch are attacked at once: per iteration one forward pass and one
    batched backward giving the two derivatives the saliency map needs (of the target
    score, and of the summed other scores), then an exact, pruned search of the best
    pixel pair per sample (:func:`best_pixel_pairs`, a few dozen candidates rather than D^2 pairs).

    Differences from torchattacks.JSMA: its untargeted default is target ``(y + 1) % 10``;
    it allows ``ceil(gamma*D/2)`` pairs (can exceed gamma*D features); its domain excludes
    pixels >= 0.99; it differentiates the logits (our ``space="logits"``).

    ``space`` chooses what is differentiated: ``"probs"``, the softmax of the model's
    scores (JSMA-F in Carlini & Wagner's terms), is what the paper's samples used
    (cleverhans' JSMA on a Keras model ending in softmax) and is the default; it is also
    the stronger of the two on MNIST (measured here on 64 test digits against a LeNet-5:
    89% vs 62% of random targets reached). ``"logits"`` (JSMA-Z) differentiates the scores themselves: use it for
    models whose scores have an arbitrary scale (e.g. summed negative distances, where
    a softmax saturates and its gradients vanish).

    Arguments:
        model (nn.Module): returns (N, K) logits/scores.
        theta (float): change of a selected feature; > 0 increases. (Default: 1.0)
        gamma (float): maximum fraction of features changed. (Default: 0.1)
        target (str | Tensor): ``"random"`` — per sample a class drawn uniformly among
            the K - 1 classes other than the true one, from a generator seeded with
            ``seed``; or a (N,) int64 tensor of target classes. (Default: "random")
        seed (int): seed of the random targets. (Default: 0)
        space (str): ``"probs"`` (softmax of the scores) or ``"logits"`` (the scores).
            (Default: "probs")
        device: see :class:`~dundi.attacks.base.Attack`.

    There is no eps: JSMA is a minimal-perturbation (L0) attack bounded by gamma.

    Shape:
        - images: (N, C, H, W) float32 in [0, 1].
        - labels: (N,) int64 true classes (used to draw random targets).
        - output: (N, C, H, W); ``run(...)`` also gives ``steps`` (N,) pairs changed and
          ``target`` (N,) the target classes.

    Example::

        >>> res = JSMA(model, theta=1.0, gamma=0.1, target="random", seed=0).run(images, labels)
        >>> success = model(res.adv).argmax(1) == res.target
    """

    name = "jsma"
    norm = "l0"
    budget_arg = "gamma"  # the largest fraction of pixels it may change
    steps_arg = None      # its work is bounded by gamma: see configured_steps
    seeded = True         # random targets

    def __init__(
        self,
        model: nn.Module,
        theta: float = 1.0,
        gamma: float = 0.1,
        target: str | Tensor = "random",
        seed: int = 0,
        space: str = "probs",
        device=None,
    ):
        super().__init__(model, device)
        if theta == 0:
            raise ValueError("theta must be non-zero")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if isinstance(target, str) and target != "random":
            raise ValueError(f"target must be 'random' or a tensor of classes, got {target!r}")
        if space not in ("logits", "probs"):
            raise ValueError(f"space must be 'logits' or 'probs', got {space!r}")
        self.theta = float(theta)
        self.gamma = float(gamma)
        self.target = target
        self.seed = int(seed)
        self.space = space

    def configured_steps(self, num_features: int) -> int:
        """Pixel-pair updates at most: gamma · pixels / 2."""
        return int(math.floor(num_features * self.gamma / 2 + 1e-9))

    def _targets(self, labels: Tensor, k: int) -> Tensor:
        n = len(labels)
        if isinstance(self.target, str):
            if k < 2:
                raise ValueError("a random target needs at least 2 classes")
            shift = self._draws(labels.device).randint(1, k, (n,))
            return (labels + shift) % k  # uniform over the other classes, never y
        target = torch.as_tensor(self.target).to(device=labels.device, dtype=torch.int64)
        if target.shape != (n,):
            raise ValueError(f"target must have shape ({n},), got {tuple(target.shape)}")
        if target.numel() and (target.min() < 0 or target.max() >= k):
            raise ValueError(f"target classes must be in [0, {k})")
        return target

    def _derivatives(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Scores, d score_target / dx and d (sum of the other scores) / dx, flattened, and the
        deciding labels (the rule, for DunDi's stand-in) from the same forward pass."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            scores, decided = scores_and_labels(self.model, x)
            if self.space == "probs":
                # Probabilities sum to 1, so the others' derivative is minus the target's:
                # one backward pass is enough.
                prob = F.softmax(scores, 1).gather(1, target[:, None]).sum()
                (gt,) = torch.autograd.grad(prob, x)
                gt = gt.flatten(1)
                return scores.detach(), gt, -gt, decided
            onehot = F.one_hot(target, scores.shape[1]).to(scores.dtype)
            vecs = torch.stack([onehot, 1.0 - onehot])
            try:
                (g,) = torch.autograd.grad(scores, x, grad_outputs=vecs, is_grads_batched=True, retain_graph=True)
            except (RuntimeError, NotImplementedError):  # no vmap rule for some layer
                g = torch.stack([torch.autograd.grad(scores, x, v, retain_graph=True)[0] for v in vecs])
        g = g.flatten(2)
        return scores.detach(), g[0], g[1], decided

    def _run(self, images: Tensor, labels: Tensor) -> AttackResult:
        n = len(images)
        shape = images.shape[1:]
        d = images[0].numel()
        k = self._check_labels(self._scores(images), labels)
        target = self._targets(labels, k)
        max_pairs = int(math.floor(d * self.gamma / 2 + 1e-9))  # 1e-9: gamma*D/2 = 2.9999..., not 2
        increase = self.theta > 0

        x = images.reshape(n, d).clone()
        domain = x < 1.0 if increase else x > 0.0
        used = torch.zeros(n, dtype=torch.int64, device=images.device)
        active = torch.arange(n, device=images.device)
        for _ in range(max_pairs):
            if len(active) == 0:
                break
            _, gt, go, decided = self._derivatives(x[active].view(-1, *shape), target[active])
            go_on = (decided != target[active]) & (domain[active].sum(1) >= 2)  # the rule reached t: stop
            active, gt, go = active[go_on], gt[go_on], go[go_on]
            if len(active) == 0:
                break
            # Increasing features want the target derivative up and the others down;
            # decreasing features the opposite: flip both signs to reuse one search.
            a, c = (gt, -go) if increase else (-gt, go)
            score, p, q = best_pixel_pairs(a, c, domain[active])
            ok = score > 0  # no admissible pair: this sample's attack has failed
            active, p, q = active[ok], p[ok], q[ok]
            for pix in (p, q):
                x[active, pix] = (x[active, pix] + self.theta).clamp_(0.0, 1.0)
                domain[active, pix] = False
            used[active] += 1
        return AttackResult(x.view(n, *shape), used, target)
