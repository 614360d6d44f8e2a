"""A certificate for a native softmax run's answer (the argmax of its float32 logits): the
softmax IBP baseline that certified DunDi is measured against on equal terms.

The same float32-aware interval bounds bound the features h entering the logit layer
(:func:`dundi.nets.bounds.propagate_served`); the logit layer is elided as in IBP (Gowal et
al. 2018): the margin logit_y − logit_c = (W_y − W_c)·h + (b_y − b_c) is linear in h, so its
minimum over the box is exact. Less the rounding of the served float32 logits (Higham's γ
over each logit's terms, with an absolute term for underflow) and of this float64 arithmetic,
a positive minimum for every other class c means the served argmax is y everywhere in the
ball -- ties included, since a tie is a margin of 0.
"""

from __future__ import annotations

import torch
from torch import nn

from dundi.errors import DundiError
from dundi.nets.bounds import ETA32, served_layers, split_last_linear
from dundi.robustness.certificate import Certifier, served_h_box
from dundi.rule.exact import U32, U64, gamma


class SoftmaxCertifier(Certifier):
    """Certificates of a native softmax network's answers in L∞ balls.

    It shares :class:`Certifier`'s public methods (``certified_at``, ``radius``, ``batched``),
    and its padded ``_slack``, which read the network only through ``_margins``; what differs is
    the margin: the logits' argmax instead of the two-step rule. A native run has no abstain gate."""

    def __init__(self, net: nn.Module):  # noqa: D107 -- Certifier's oracle set does not apply
        body, head = split_last_linear(net)
        self.body = served_layers(body)
        self.w = head.weight.detach().double().clone()
        self.b = (head.bias.detach().double().clone() if head.bias is not None
                  else torch.zeros(self.w.shape[0], dtype=torch.float64))
        self.num_classes, hidden = self.w.shape
        self.bounded = 0
        self.logit_rel = gamma(hidden + 1, U32)          # each served float32 logit, any order
        self.logit_abs = (hidden + 1) * ETA32 / 2        # ... and its underflows (half a subnormal a product)
        self.rel = 4 * gamma(hidden + 4, U64)            # this float64 margin arithmetic

    def _margins(self, images: torch.Tensor, y: torch.Tensor, eps, gate) -> torch.Tensor:
        """(B, 1) on a padded batch (:meth:`Certifier._slack`): the smallest lower bound of
        logit_y − logit_c over the ball as served and over c ≠ y, less every rounding
        allowance; certified where positive."""
        if gate is not None and gate.active:
            raise DundiError("a native run has no abstain gate to certify: omit the gate")
        h_lo, h_hi, _ = served_h_box(self.body, images, eps)
        centre, radius = (h_hi + h_lo) / 2, (h_hi - h_lo) / 2
        reach = torch.maximum(h_lo.abs(), h_hi.abs())                      # (B, H) bound on |h|
        diff_w = self.w[y][:, None, :] - self.w[None]                      # (B, C, H) W_y − W_c
        diff_b = self.b[y][:, None] - self.b[None]                         # (B, C)
        lowest = ((diff_w @ centre[:, :, None]).squeeze(-1) + diff_b
                  - (diff_w.abs() @ radius[:, :, None]).squeeze(-1))
        logit_error = self.logit_rel * (reach @ self.w.abs().T + self.b.abs()) + self.logit_abs  # (B, C)
        own_error = logit_error.gather(1, y[:, None])
        here = self.rel * ((diff_w.abs() @ reach[:, :, None]).squeeze(-1) + diff_b.abs())
        margin = lowest - logit_error - own_error - here
        margin[torch.arange(len(y)), y] = torch.inf
        return margin.min(1, keepdim=True).values


__all__ = ["SoftmaxCertifier"]
