"""Torch side of classification: a brute-force reference of Algorithm 1 and the
differentiable per-class score the adaptive attacks go through.

Neither uses FAISS: the reference exists to check :mod:`dundi.rule.index` against an
independent implementation, and the score must carry gradients back to the input.
"""

from __future__ import annotations

import torch
from torch import nn

from dundi.rule.distance import DEFAULT_DISTANCE, Distance
from dundi.rule.exact import INVARIANT_ROWS as ROWS, invariant_linear
from dundi.rule.params import ResolvedRule


def _checked(rule: ResolvedRule, oracles: torch.Tensor) -> ResolvedRule:
    """Refuse what is not an index's resolved rule for oracles (C, ≥n, D) with k <= C."""
    if not isinstance(rule, ResolvedRule):
        raise TypeError(f"pass the rule as OracleIndex.resolve(request) returns it, not {type(rule).__name__}")
    if oracles.ndim != 3 or oracles.shape[1] < rule.n or not 1 <= rule.k <= oracles.shape[0]:
        raise ValueError(f"need oracles (C, n, D) for the rule's n with 1 <= k <= C; got "
                         f"{tuple(oracles.shape)} for {rule}")
    return rule


def counted_scores(dist: torch.Tensor, eff: torch.Tensor | None, length: int) -> torch.Tensor:
    """(B, C) Algorithm 1 scores from distances (B, C, length) to the padded view's rows
    (:meth:`dundi.rule.index.OracleIndex.padded`): the summed similarity, or -- for a class
    whose ``eff`` real rows are fewer than ``length`` -- their mean × length, as the index
    scores it. ``eff`` None: every row is real."""
    if eff is None:
        return -dist.sum(-1)
    real = torch.arange(length, device=dist.device)[None, :] < eff[:, None]
    s = -torch.where(real, dist, torch.zeros((), dtype=dist.dtype, device=dist.device)).sum(-1)
    return torch.where(eff < length, s * length / eff.clamp_min(1), s)


def two_step_reference(queries: torch.Tensor, oracles: torch.Tensor, rule: ResolvedRule,
                       counts: list[int] | None = None) -> torch.Tensor:
    """Algorithm 1 under ``rule`` (resolved by the index), literally, in float64. ``oracles`` is
    (C, ≥n, D); returns labels (B,).

    Step 1 ranks classes by summed similarity (−distance) to their first m oracles, ties to
    the lower class index; step 2 takes the first maximum over those k classes, in step-1
    order, of the summed similarity to their first n oracles. ``counts`` (per class, optional)
    says how many of a class's rows are real: a class holding fewer than m (n) uses all it
    holds and scores its mean similarity times m (n), see :mod:`dundi.rule.index`.
    """
    n, m, k, distance = rule.n, rule.m, rule.k, _checked(rule, oracles).distance
    q = queries.double()
    o = oracles.double()
    counts = [o.shape[1]] * len(o) if counts is None else [int(c) for c in counts]

    def score(x: torch.Tensor, c: int, length: int) -> float:
        eff = min(length, counts[c])
        total = -distance.torch_of_diff(o[c, :eff] - x).sum().item()
        return total if eff == length else total * length / eff

    labels = []
    for x in q:
        coarse = [score(x, c, m) for c in range(len(o))]
        selected = sorted(range(len(o)), key=lambda c: (-coarse[c], c))[:k]
        best, best_sim = None, None
        for c in selected:
            sim = score(x, c, n)
            if best_sim is None or sim > best_sim:
                best, best_sim = c, sim
        labels.append(best)
    return torch.tensor(labels, dtype=torch.int64)


def class_scores(embeddings: torch.Tensor, oracles: torch.Tensor, eps: float = 1e-12,
                 distance: Distance = DEFAULT_DISTANCE) -> torch.Tensor:
    """Differentiable per-class scores (B, C): summed similarity of each embedding to each
    class's oracle embeddings ``oracles`` (C, n, D). Equals the fine step of Algorithm 1
    for every class, so its argmax is the two-step label when k = C."""
    diff = embeddings[:, None, None, :] - oracles[None]
    return -distance.torch_of_diff(diff, eps).sum(-1)


class OracleScorer(nn.Module):
    """Distance NN + oracle embeddings as one module returning class scores: the white-box
    stand-in for DunDi that the ``adaptive`` threat model attacks."""

    def __init__(self, distance_net: nn.Module, oracles: torch.Tensor, distance: Distance = DEFAULT_DISTANCE):
        super().__init__()
        self.distance_net = distance_net
        self.distance = distance
        self.register_buffer("oracles", oracles.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return class_scores(self.distance_net(x), self.oracles, distance=self.distance)


def step1_kept(coarse: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C) bool: the k classes step 1 keeps, ranked by coarse score with ties to the lower
    class index (a stable descending sort, as :func:`dundi.rule.search.top_k`)."""
    order = torch.sort(-coarse, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(coarse, dtype=torch.bool).scatter_(1, order, True)


def two_step_labels(coarse: torch.Tensor, fine: torch.Tensor, k: int) -> torch.Tensor:
    """Algorithm 1's label from (B, C) coarse and fine scores: the first maximum of the fine
    score over the kept classes, taken in step-1 order."""
    order = torch.sort(-coarse, dim=1, stable=True).indices[:, :k]
    best = fine.gather(1, order).argmax(1)  # torch's argmax returns the first maximum
    return order.gather(1, best[:, None]).squeeze(1)


def two_step_scores(coarse: torch.Tensor, fine: torch.Tensor, k: int) -> torch.Tensor:
    """Differentiable (B, C) scores whose argmax is Algorithm 1's label for any k.

    A kept class scores its fine score. Every other class keeps its own fine score (so its
    gradient and its order among the dropped classes survive) minus a per-row offset that
    puts the best of them strictly below the worst kept class. A kept class tied with the
    label on the fine score but later in step-1 order is nudged a few ulps down, so the
    first-maximum rule of step 2 is also the plain argmax. Offsets are detached: they
    decide the order, not the gradient.
    """
    with torch.no_grad():
        kept = step1_kept(coarse, k)
        label = two_step_labels(coarse, fine, k)
        inf = torch.tensor(float("inf"), dtype=fine.dtype, device=fine.device)
        floor = torch.where(kept, fine, inf).amin(1, keepdim=True)
        top = fine.gather(1, label[:, None])
        tiny = 8 * torch.finfo(fine.dtype).eps * (top.abs() + 1)
        gap = 1e-3 * (floor.abs() + 1)
        dropped_max = torch.where(kept, -inf, fine).amax(1, keepdim=True)
        drop = (dropped_max - floor).clamp(min=0).nan_to_num(0.0) + gap
        is_label = torch.zeros_like(kept).scatter_(1, label[:, None], True)
        tied = kept & ~is_label & (fine >= top)
        offset = torch.where(kept, torch.where(tied, fine - top + tiny, 0.0), drop)
    return fine - offset


class TwoStepScorer(nn.Module):
    """The ``adaptive`` threat model's stand-in for Algorithm 1 under ``rule`` (a
    :class:`ResolvedRule`, n the oracles'):
    Distance NN + oracles (C, n, D) -- the index's padded view, with ``counts`` (C,) the
    oracles each class holds where some hold fewer than n -- → (B, C) scores whose argmax is the two-step label
    (:func:`two_step_scores`), divided by ``scale`` (argmax unchanged; keeps a cross-entropy
    out of float32 saturation).

    ``judge`` (optional) maps embeddings (B, D) to the deployed rule's labels, e.g. the
    index's :meth:`~dundi.rule.index.OracleIndex.classify`; :meth:`scores_and_labels` then
    returns those labels, which attacks use for early stopping, restarts and black-box
    acceptance (:func:`dundi.attacks.base.scores_and_labels`). :meth:`coarse_scores` is what
    the step-1 attack climbs."""

    def __init__(self, distance_net: nn.Module, oracles: torch.Tensor, rule: ResolvedRule,
                 scale: float = 1.0, judge=None, eps: float = 1e-12, counts=None):
        super().__init__()
        _checked(rule, oracles)
        if oracles.shape[1] != rule.n:
            raise ValueError(f"need the oracles' first n={rule.n} per class; got {tuple(oracles.shape)}")
        self.distance_net = distance_net
        self.register_buffer("oracles", oracles.float())
        self.register_buffer("oracle_sq", (self.oracles ** 2).sum(-1).reshape(-1))
        short = counts is not None and int(min(counts)) < rule.n
        self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float32) if short else None)
        self.rule, self.scale, self.judge, self.eps = rule, float(scale), judge, eps
        self.m, self.k, self.distance = rule.m, rule.k, rule.distance

    def _coarse_fine(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self._distances(emb)
        if self.counts is None:
            return -dist[:, :, :self.m].sum(-1), -dist.sum(-1)
        return (counted_scores(dist[:, :, :self.m], self.counts.clamp(max=self.m), self.m),
                counted_scores(dist, self.counts.clamp(max=self.rule.n), self.rule.n))

    def _distances(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, C, n) distances to every oracle through one matrix product, ‖e‖² + ‖o‖² − 2 e·o.
        Attacks call this at every step and query; the (B, C, n, D) difference tensor of
        :func:`class_scores` cost 2-20x the network itself (measured in bench/attacks.py).
        The rounding differs from the difference form by ~1e-6 relative: only the deployed
        rule (``judge``) decides labels in an evaluation, so near-ties are judged exactly. The
        product is :func:`dundi.rule.exact.invariant_linear` (a 1×1 convolution) over at most
        ``ROWS`` rows at a time, so a row's distances and their gradient are the same bits in
        any batch (one torch thread): a BLAS product blocks batches differently, and the
        convolution's backward changes path beyond 8 rows."""
        c, n, d = self.oracles.shape
        flat = self.oracles.reshape(c * n, d)
        dots = torch.cat([invariant_linear(emb[i:i + ROWS], flat) for i in range(0, len(emb), ROWS)]) \
            if len(emb) else emb @ flat.T
        dist = self.distance.torch_pairwise(emb, flat, self.eps, dots=dots, sq_norms=self.oracle_sq)
        return dist.reshape(len(emb), c, n)

    def coarse_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) step-1 scores over the first m oracles, divided by ``scale``."""
        return self._coarse_fine(self.distance_net(x))[0] / self.scale

    def _labels(self, emb: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        if self.judge is None:
            return two_step_labels(coarse.detach(), fine.detach(), self.k)
        return torch.as_tensor(self.judge(emb.detach()), device=coarse.device).long()

    def coarse_scores_and_labels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: the step-1 scores (divided by ``scale``) and the rule's labels."""
        emb = self.distance_net(x)
        coarse, fine = self._coarse_fine(emb)
        return coarse / self.scale, self._labels(emb, coarse, fine)

    def scores_and_labels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: the stand-in's scores and the deployed rule's labels."""
        emb = self.distance_net(x)
        coarse, fine = self._coarse_fine(emb)
        return two_step_scores(coarse, fine, self.k) / self.scale, self._labels(emb, coarse, fine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return two_step_scores(*self._coarse_fine(self.distance_net(x)), self.k) / self.scale
