"""Torch side of classification: a brute-force reference of Algorithm 1 and the
differentiable per-class score the adaptive attacks go through.

Neither uses FAISS: the reference exists to check :mod:`dundi.rule.index` against an
independent implementation, and the score must carry gradients back to the input.
"""

from __future__ import annotations

import torch
from torch import nn

from dundi.rule.exact import INVARIANT_ROWS as ROWS, invariant_linear
from dundi.rule.params import TwoStepRule


def oracle_distances(diff: torch.Tensor, metric: str = "euclidean", eps: float = 0.0) -> torch.Tensor:
    """Distances along the last axis of embedding differences: Euclidean (``eps`` keeps the
    square root differentiable at 0) or squared Euclidean, as the run's ``metric`` says."""
    d2 = (diff ** 2).sum(-1)
    return d2 if metric == "sqeuclidean" else torch.sqrt(d2 + eps)


def two_step_reference(queries: torch.Tensor, oracles: torch.Tensor, rule: TwoStepRule,
                       counts: list[int] | None = None) -> torch.Tensor:
    """Algorithm 1 under ``rule``, literally, in float64. ``oracles`` is (C, n_max, D) (the rule
    is resolved against n_max, Euclidean unless it names its metric); returns labels (B,).

    Step 1 ranks classes by summed similarity (−distance) to their first m oracles, ties to
    the lower class index; step 2 takes the first maximum over those k classes, in step-1
    order, of the summed similarity to their first n oracles. ``counts`` (per class, optional)
    says how many of a class's rows are real: a class holding fewer than m (n) uses all it
    holds and scores its mean similarity times m (n), see :mod:`dundi.rule.index`.
    """
    rule = rule.resolved(oracles.shape[1], rule.metric or "euclidean")
    n, m, k, metric = rule.n, rule.m, rule.k, rule.metric
    q = queries.double()
    o = oracles.double()
    counts = [o.shape[1]] * len(o) if counts is None else [int(c) for c in counts]

    def score(x: torch.Tensor, c: int, length: int) -> float:
        eff = min(length, counts[c])
        total = -oracle_distances(o[c, :eff] - x, metric).sum().item()
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
                 metric: str = "euclidean") -> torch.Tensor:
    """Differentiable per-class scores (B, C): summed similarity of each embedding to each
    class's oracle embeddings ``oracles`` (C, n, D). Equals the fine step of Algorithm 1
    for every class, so its argmax is the two-step label when k = C."""
    diff = embeddings[:, None, None, :] - oracles[None]
    return -oracle_distances(diff, metric, eps).sum(-1)


class OracleScorer(nn.Module):
    """Distance NN + oracle embeddings as one module returning class scores: the white-box
    stand-in for DunDi that the ``adaptive`` threat model attacks."""

    def __init__(self, distance_net: nn.Module, oracles: torch.Tensor, metric: str = "euclidean"):
        super().__init__()
        self.distance_net = distance_net
        self.metric = metric
        self.register_buffer("oracles", oracles.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return class_scores(self.distance_net(x), self.oracles, metric=self.metric)


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
    """The ``adaptive`` threat model's stand-in for Algorithm 1 under ``rule`` (its n is the
    oracles'):
    Distance NN + oracles (C, n, D) → (B, C) scores whose argmax is the two-step label
    (:func:`two_step_scores`), divided by ``scale`` (argmax unchanged; keeps a cross-entropy
    out of float32 saturation).

    ``judge`` (optional) maps embeddings (B, D) to the deployed rule's labels, e.g. the
    index's :meth:`~dundi.rule.index.OracleIndex.classify`; :meth:`scores_and_labels` then
    returns those labels, which attacks use for early stopping, restarts and black-box
    acceptance (:func:`dundi.attacks.base.scores_and_labels`). :meth:`coarse_scores` is what
    the step-1 attack climbs."""

    def __init__(self, distance_net: nn.Module, oracles: torch.Tensor, rule: TwoStepRule,
                 scale: float = 1.0, judge=None, eps: float = 1e-12):
        super().__init__()
        if oracles.ndim == 3:  # n is the oracles' own; Euclidean unless the rule names its metric
            rule = rule.resolved(oracles.shape[1], rule.metric or "euclidean")
        if oracles.ndim != 3 or oracles.shape[1] != rule.n or not 1 <= rule.k <= oracles.shape[0]:
            raise ValueError(f"need oracles (C, n, D) for the rule's n with 1 <= k <= C; got "
                             f"{tuple(oracles.shape)} for {rule}")
        self.distance_net = distance_net
        self.register_buffer("oracles", oracles.float())
        self.register_buffer("oracle_sq", (self.oracles ** 2).sum(-1).reshape(-1))
        self.rule, self.scale, self.judge, self.eps = rule, float(scale), judge, eps
        self.m, self.k, self.metric = rule.m, rule.k, rule.metric

    def _coarse_fine(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self._distances(emb)
        return -dist[:, :, :self.m].sum(-1), -dist.sum(-1)

    def _distances(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, C, n) distances to every oracle through one matrix product, ‖e‖² + ‖o‖² − 2 e·o.
        Attacks call this at every step and query; the (B, C, n, D) difference tensor of
        :func:`oracle_distances` cost 2-20x the network itself (measured in bench/attacks.py).
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
        d2 = (emb * emb).sum(1, keepdim=True) + self.oracle_sq - 2.0 * dots
        d2 = d2.clamp_min(0.0).reshape(len(emb), c, n)
        return d2 if self.metric == "sqeuclidean" else torch.sqrt(d2 + self.eps)

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
