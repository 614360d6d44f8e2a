"""Triplet losses on embeddings: the paper's sigmoid loss (default) and the margin loss.

Kept apart, as in pytorch-metric-learning: ``distance`` computes ‖a − b‖₂, ``mine_batch_hard``
picks tuples, ``triplet_loss`` turns (d_ap, d_an) into a loss. They combine by keyword.
"""

from __future__ import annotations

import torch

from dundi.training.config import LOSSES


def distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance along the last axis; ``eps`` keeps the gradient finite at 0."""
    return torch.sqrt(((a - b) ** 2).sum(-1) + eps)


def triplet_loss(d_ap: torch.Tensor, d_an: torch.Tensor, kind: str = "sigmoid",
                 margin: float = 1.0) -> torch.Tensor:
    """Per-tuple loss.

    ``sigmoid`` (paper §3.3): expected discrepancy 1, predicted sigmoid(d_an − d_ap),
    loss = 1 − sigmoid(d_an − d_ap), computed as sigmoid(d_ap − d_an): the same value, but
    ``1.0 - sigmoid`` rounds to exactly 0 (zero gradient) once d_an − d_ap > ~17, which would
    starve adversarial training of its gradient. ``margin``: max(0, d_ap − d_an + margin).
    """
    if kind == "sigmoid":
        return torch.sigmoid(d_ap - d_an)
    if kind == "margin":
        return torch.relu(d_ap - d_an + margin)
    raise ValueError(f"unknown triplet loss {kind!r}: choose one of {LOSSES}")


def tuple_distances(emb_a: torch.Tensor, emb_p: torch.Tensor, emb_n: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return distance(emb_a, emb_p), distance(emb_a, emb_n)


def mine_batch_hard(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-hard mining (Hermans et al. 2017): for every anchor, its farthest positive and
    nearest negative in the batch. Returns (d_ap, d_an) for anchors that have both."""
    d = distance(emb[:, None, :], emb[None, :, :])
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos = same & ~eye
    neg = ~same
    valid = pos.any(1) & neg.any(1)
    d_ap = torch.where(pos, d, torch.full_like(d, -float("inf"))).max(1).values
    d_an = torch.where(neg, d, torch.full_like(d, float("inf"))).min(1).values
    return d_ap[valid], d_an[valid]
