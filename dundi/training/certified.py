"""Certified training of a Distance NN: interval bound propagation through the embedding,
with the batch itself as the oracle database.

Why this head: Algorithm 1 under the squared Euclidean distance ranks classes by their mean
squared distance to a set of oracles, and mean_j ‖z − o_cj‖² = ‖z‖² − 2 z·μ_c + ν̄_c, where
μ_c is the oracles' mean and ν̄_c their mean squared norm. The ‖z‖² term is shared by every
class, so the rule is a linear classifier on z with weights 2μ_c and biases −ν̄_c — and its
worst case over an interval box is exact once the last Linear layer is folded in (IBP's
elided last layer, Gowal et al. 2018). Training takes class-balanced batches (``per_class``
images of each class), uses the other members of each class as that class's oracles (leave
one out for the query's own class: a query is never its own oracle, as it is not at test
time), and minimises

    (1 − mix) · CE(clean logits) + mix · CE(worst-case logits over the eps box),

with eps ramped up from 0 and mix from 0 (the IBP schedule; a full budget from random
weights collapses). The deployed oracle database is n random training images per class, so
the model is trained on the statistic it is judged by.

With ``--cert-head prototypes`` the head's weights are free instead: learned class prototypes
p_c and spreads s_c (``DistanceNet.prototype_head``), as a softmax network's last layer is
free; the index then stores the prototypes themselves as oracles (two vectors per class
realise the head exactly), since no n real training images realise it (measured in
docs/results/certified/equal-terms: the prototype head certifies as softmax IBP does, images
herded toward it ten points less).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dundi.nets.bounds import input_box, split_last_linear


def class_statistics(emb: torch.Tensor, labels: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class: sum of embeddings σ (C, D), sum of squared norms ν (C,), count (C,)."""
    one_hot = nn.functional.one_hot(labels, num_classes).to(emb.dtype)   # (B, C)
    return one_hot.T @ emb, one_hot.T @ (emb * emb).sum(1), one_hot.sum(0)


def oracle_head(emb: torch.Tensor, labels: torch.Tensor, num_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query the head's weights 2μ_c (B, C, D) and biases −ν̄_c (B, C), with the query
    left out of its own class's oracles. logits = z·W + bias ranks like −mean ‖z − o‖²."""
    sigma, nu, count = class_statistics(emb, labels, num_classes)
    rows = torch.arange(len(labels), device=labels.device)
    sig = sigma[None].repeat(len(labels), 1, 1)
    nus = nu[None].repeat(len(labels), 1)
    cnt = count[None].repeat(len(labels), 1)
    sig[rows, labels] -= emb
    nus[rows, labels] -= (emb * emb).sum(1)
    cnt[rows, labels] -= 1
    cnt = cnt.clamp_min(1)
    return 2 * sig / cnt[..., None], -nus / cnt


def elided_margins(g: torch.Tensor, offset: torch.Tensor, h_lo: torch.Tensor, h_hi: torch.Tensor
                   ) -> torch.Tensor:
    """Exact upper bounds over the box [h_lo, h_hi] of the (B, C) margins g·h + offset:
    IBP's elided last layer, where the last layer is folded into the logit differences."""
    centre, radius = (h_hi + h_lo) / 2, (h_hi - h_lo) / 2
    return (g @ centre[:, :, None]).squeeze(-1) + offset + (g.abs() @ radius[:, :, None]).squeeze(-1)


def worst_case_logits(h_lo: torch.Tensor, h_hi: torch.Tensor, last: nn.Linear, weights: torch.Tensor,
                      biases: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Upper bounds of logit_c − logit_y over the box of the penultimate activations h (the
    true class's entry is 0): CE of these is IBP's robust loss."""
    rows = torch.arange(len(labels), device=labels.device)
    diff_w = weights - weights[rows, labels][:, None, :]                 # (B, C, D)
    diff_b = biases - biases[rows, labels][:, None]                      # (B, C)
    return elided_margins(diff_w @ last.weight, diff_w @ last.bias + diff_b, h_lo, h_hi)


def softmax_worst_case_logits(h_lo: torch.Tensor, h_hi: torch.Tensor, head: nn.Linear,
                              labels: torch.Tensor) -> torch.Tensor:
    """The same bounds for a softmax network whose logits are head(h) (Gowal et al. 2018)."""
    w, b = head.weight, head.bias
    return elided_margins(w[None] - w[labels][:, None], b[None] - b[labels][:, None], h_lo, h_hi)


def _mixed(logits: torch.Tensor, worst: torch.Tensor | None, labels: torch.Tensor, mix: float
           ) -> tuple[torch.Tensor, dict]:
    """(1 − mix) · CE(clean) + mix · CE(worst case) -- IBP's κ-schedule with κ = 1 − mix --
    and the batch's clean and certified accuracy."""
    loss = nn.functional.cross_entropy(logits, labels)
    stats = {"clean": (logits.argmax(1) == labels).float().mean().item()}
    if worst is not None:
        loss = (1 - mix) * loss + mix * nn.functional.cross_entropy(worst, labels)
        others = worst.detach().clone()
        others[torch.arange(len(labels), device=labels.device), labels] = -torch.inf
        stats["certified"] = (others.amax(1) < 0).float().mean().item()
    return loss, stats


def certified_batch_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         num_classes: int, eps: float, mix: float) -> tuple[torch.Tensor, dict]:
    """The mixed clean / worst-case loss of one class-balanced batch, and its clean and
    batch-certified accuracy (certified against the batch's own oracles). ``model`` is a
    Distance NN, possibly wrapped in DistributedDataParallel."""
    inner = getattr(model, "module", model)
    _, last = split_last_linear(inner)
    robust = eps > 0 and mix > 0
    out = model(images, box=input_box(images, eps)) if robust else model(images)
    emb = out[0] if robust else out
    learned = inner.prototype_head()
    if learned is None:
        weights, biases = oracle_head(emb, labels, num_classes)
    else:
        weights, biases = learned[0].expand(len(labels), -1, -1), learned[1].expand(len(labels), -1)
    logits = (weights @ emb[:, :, None]).squeeze(-1) + biases
    worst = worst_case_logits(out[1], out[2], last, weights, biases, labels) if robust else None
    return _mixed(logits, worst, labels, mix)


def softmax_certified_batch_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                                 num_classes: int, eps: float, mix: float) -> tuple[torch.Tensor, dict]:
    """The same loss for a native softmax network (IBP, Gowal et al. 2018): the baseline that
    certified DunDi is measured against on equal terms (same batches, schedule and bounds)."""
    _, head = split_last_linear(getattr(model, "module", model))
    robust = eps > 0 and mix > 0
    out = model(images, box=input_box(images, eps)) if robust else model(images)
    logits = out[0] if robust else out
    worst = softmax_worst_case_logits(out[1], out[2], head, labels) if robust else None
    return _mixed(logits, worst, labels, mix)


def balanced_batches(labels: np.ndarray, per_class: int, epoch: int, seed: int) -> list[np.ndarray]:
    """One epoch of class-balanced batches: ``per_class`` images of every class in each, each
    class's images in a seeded per-epoch order; as many batches as the smallest class fills."""
    rng = np.random.default_rng([seed, epoch])
    classes = np.unique(labels)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    steps = min(len(m) for m in members) // per_class
    return [np.concatenate([m[s * per_class:(s + 1) * per_class] for m in members])
            for s in range(steps)]


def schedule(epoch_progress: float, warmup: float, ramp: float, eps: float, mix: float
             ) -> tuple[float, float]:
    """(eps, mix) at a point of training measured in epochs: clean only during ``warmup``
    epochs, then both grow linearly over ``ramp`` epochs to their final values."""
    t = min(max((epoch_progress - warmup) / max(ramp, 1e-9), 0.0), 1.0)
    return eps * t, mix * t


__all__ = ["class_statistics", "oracle_head", "elided_margins", "worst_case_logits",
           "softmax_worst_case_logits", "certified_batch_loss", "softmax_certified_batch_loss",
           "balanced_batches", "schedule"]
