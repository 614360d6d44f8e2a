"""Adversarial training losses: DunDi-AT (adversarial triplet anchors) and Madry-style PGD
training of native models.

Both craft L∞ PGD examples against the *current* model inside the training step. DunDi-AT
follows TLA (Mao et al. 2019, "Metric Learning for Adversarial Robustness"): the anchor is
perturbed to maximise the triplet loss of its tuple — pushing f(x_a) away from its positive
and towards its negative — and the model then learns to keep that adversarial anchor
closer to the positive than to the negative. The inner loop is written here rather than
taken from an attack class because its objective is a tuple loss, not a class score; its L∞
projection and eval mode are the attacks' own (:mod:`dundi.attacks.base`), so training and
evaluation clip the same way.
"""

from __future__ import annotations

from typing import Callable

import torch

from dundi.attacks.base import eval_mode, project_linf


def pgd_maximise(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float,
                 alpha: float, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """L∞ PGD with a random start: returns x' in the eps-ball around x, pixels in [0, 1],
    that (locally) maximises ``loss_fn(x')`` (a scalar summed over the batch)."""
    x = x.detach()
    # drawn on the CPU generator, then moved: the same starts on every device, and CUDA tensors
    # cannot be drawn from a CPU generator
    delta = ((torch.rand(x.shape, generator=generator) * 2 - 1) * eps).to(x.device)
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(x_adv), x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = project_linf(x_adv, x, eps)
    return x_adv.detach()


def adversarial_anchors(model: torch.nn.Module, x_a: torch.Tensor, emb_p: torch.Tensor,
                        emb_n: torch.Tensor, loss_of: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                        eps: float, alpha: float, steps: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Anchors perturbed to maximise the triplet loss against fixed positive/negative embeddings."""
    emb_p, emb_n = emb_p.detach(), emb_n.detach()
    with eval_mode(model):
        return pgd_maximise(lambda xa: loss_of(model(xa), emb_p, emb_n).sum(), x_a, eps, alpha, steps, generator)


def class_prototypes(emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, D) mean embedding per class; rows of classes absent from ``labels`` are NaN."""
    sums = torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype, device=emb.device)
    sums.index_add_(0, labels, emb)
    counts = torch.bincount(labels, minlength=num_classes).to(emb.dtype)[:, None]
    return sums / counts  # 0/0 = NaN for absent classes


def prototype_distances(emb: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, C) distances from each embedding to each class prototype; inf for classes whose
    prototype is NaN (absent from the batch), so they are never the nearest."""
    present = ~torch.isnan(prototypes).any(1)
    d = torch.cdist(emb, torch.nan_to_num(prototypes))
    return torch.where(present[None, :], d, torch.full_like(d, float("inf")))


def prototype_margin(emb: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Per-sample CW margin of the nearest-prototype rule: the distance to the own class's
    prototype minus the distance to the nearest other prototype (positive = misclassified).
    Classes with a NaN prototype are skipped."""
    d = prototype_distances(emb, prototypes)
    own = d.gather(1, labels[:, None]).squeeze(1)
    other = d.scatter(1, labels[:, None], float("inf")).amin(1)
    return own - other


def adversarial_anchors_to_classes(model: torch.nn.Module, x_a: torch.Tensor, y_a: torch.Tensor,
                                   prototypes: torch.Tensor, eps: float, alpha: float, steps: int,
                                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Anchors perturbed to leave their class for the nearest other one: PGD on the
    nearest-prototype margin, the same objective as the adaptive attack on the two-step rule
    (prototypes stand in for the oracle database), so training sees the attacker's move."""
    prototypes = prototypes.detach()
    with eval_mode(model):
        return pgd_maximise(lambda xa: prototype_margin(model(xa), y_a, prototypes).sum(),
                            x_a, eps, alpha, steps, generator)


def adversarial_inputs_ce(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                          alpha: float, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Madry et al. (2018): PGD examples maximising cross-entropy, for adversarial training."""
    with eval_mode(model):
        return pgd_maximise(lambda xa: torch.nn.functional.cross_entropy(model(xa), y, reduction="sum"),
                            x, eps, alpha, steps, generator)
