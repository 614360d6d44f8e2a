"""Torch side of classification: a brute-force reference of Algorithm 1 and the
differentiable per-class score the adaptive attacks go through.

Neither uses FAISS: the reference exists to check :mod:`dundi.oracle` against an
independent implementation, and the score must carry gradients back to the input.
"""

from __future__ import annotations

import torch
from torch import nn


def oracle_distances(diff: torch.Tensor, metric: str = "euclidean", eps: float = 0.0) -> torch.Tensor:
    """Distances along the last axis of embedding differences: Euclidean (``eps`` keeps the
    square root differentiable at 0) or squared Euclidean, as the run's ``metric`` says."""
    d2 = (diff ** 2).sum(-1)
    return d2 if metric == "sqeuclidean" else torch.sqrt(d2 + eps)


def two_step_reference(queries: torch.Tensor, oracles: torch.Tensor, n: int, m: int, k: int,
                       metric: str = "euclidean") -> torch.Tensor:
    """Algorithm 1, literally, in float64. ``oracles`` is (C, n_max, D); returns labels (B,).

    Step 1 ranks classes by summed similarity (−distance) to their first m oracles, ties to
    the lower class index; step 2 takes the first maximum over those k classes, in step-1
    order, of the summed similarity to their first n oracles.
    """
    q = queries.double()
    o = oracles.double()
    labels = []
    for x in q:
        coarse = [-oracle_distances(o[c, :m] - x, metric).sum() for c in range(len(o))]
        coarse = torch.stack(coarse)
        selected = sorted(range(len(o)), key=lambda c: (-coarse[c].item(), c))[:k]
        best, best_sim = None, None
        for c in selected:
            sim = -oracle_distances(o[c, :n] - x, metric).sum().item()
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
