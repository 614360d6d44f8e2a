"""Sanity checks in the spirit of auto-attack's ``checks.py``: cheap tests that flag an
evaluation whose numbers would be meaningless.

Each check returns a list of warning strings (empty when all is well) and also emits
each one with ``warnings.warn(..., AttackCheckWarning)``, so scripts can print them and
tests can assert on them.

- :func:`check_outputs`: outputs that look like probabilities (attacks want logits or
  scores: softmax saturates and its gradients vanish) or that are not deterministic.
- :func:`check_gradients`: input gradients that are zero or vanishing for some samples.
- :func:`check_black_box_vs_white_box`: a score-based black-box attack (Square) doing
  better than the gradient attacks is the classic sign of gradient masking.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .base import eval_mode, input_grad, model_device


class AttackCheckWarning(UserWarning):
    """An evaluation sanity check failed."""


def _emit(messages: list[str]) -> list[str]:
    for msg in messages:
        warnings.warn(msg, AttackCheckWarning, stacklevel=3)
    return messages


def _to_device(model: nn.Module, *tensors: Tensor) -> list[Tensor]:
    dev = model_device(model) or tensors[0].device
    return [t.detach().to(dev) for t in tensors]


def check_outputs(model: nn.Module, images: Tensor, atol: float = 1e-4) -> list[str]:
    """Warn if the model's outputs look like probabilities, or differ between two runs.

    images: (N, C, H, W) in [0, 1]. Returns the warnings (also emitted).
    """
    (images,) = _to_device(model, images)
    with eval_mode(model), torch.no_grad():
        out = model(images)
        again = model(images)
    msgs = []
    if out.dim() != 2:
        msgs.append(f"model output has shape {tuple(out.shape)}; attacks expect (N, num_classes) scores")
        return _emit(msgs)
    if bool((out >= 0).all()) and torch.allclose(out.sum(1), torch.ones_like(out[:, 0]), atol=atol):
        msgs.append(
            "model outputs look like probabilities (non-negative rows summing to 1): attacks "
            "expect logits or scores; softmax outputs saturate, gradients vanish and the "
            "robustness is overestimated. Remove the final softmax."
        )
    if not torch.equal(out, again):
        msgs.append(
            "model outputs differ between two identical forward passes in eval mode: a "
            "randomised model needs an attack that averages gradients (EOT)."
        )
    return _emit(msgs)


def check_gradients(model: nn.Module, images: Tensor, labels: Tensor, loss: str = "ce",
                    tol: float = 1e-12) -> list[str]:
    """Warn if the input gradient of the loss is zero (max |grad| <= tol) for some samples.

    images: (N, C, H, W) in [0, 1]; labels: (N,) int64. With ``loss="ce"`` it also tells
    whether the margin loss still has gradients there (saturated softmax, not a flat model).
    Returns the warnings (also emitted).
    """
    images, labels = _to_device(model, images, labels)
    with eval_mode(model):
        grad, _ = input_grad(model, images, labels, loss)
        zero = grad.flatten(1).abs().amax(1) <= tol
        n_zero = int(zero.sum())
        msgs = []
        if n_zero:
            what = f"all {n_zero}" if n_zero == len(images) else f"{n_zero} of {len(images)}"
            msg = (f"the {loss} loss has zero input gradient for {what} samples: gradient-based "
                   f"attacks cannot move them and their robustness is unreliable")
            if loss == "ce":
                g_margin, _ = input_grad(model, images[zero], labels[zero], "margin")
                if bool((g_margin.flatten(1).abs().amax(1) > tol).any()):
                    msg += "; the margin loss still has gradients there (saturated softmax): use loss='margin'"
                else:
                    msg += " (also with the margin loss: the gradients are masked or the model is flat)"
            msgs.append(msg + ".")
    return _emit(msgs)


def check_black_box_vs_white_box(white_box_success, black_box_success, tol: float = 0.0) -> list[str]:
    """Warn if a black-box attack succeeds more often than the white-box ones.

    Arguments are success rates (floats in [0, 1]) or per-sample boolean tensors "was
    fooled" of one length (the white-box one ideally the worst case over the gradient
    attacks). Success above white-box + tol indicates gradient masking.
    """
    msgs = []
    if torch.is_tensor(white_box_success) and torch.is_tensor(black_box_success):
        wb, bb = white_box_success.bool().cpu(), black_box_success.bool().cpu()
        if wb.shape != bb.shape:
            raise ValueError(f"per-sample flags differ in shape: {tuple(wb.shape)} vs {tuple(bb.shape)}")
        only_bb = int((bb & ~wb).sum())
        wb_rate, bb_rate = wb.float().mean().item(), bb.float().mean().item()
    else:
        wb_rate, bb_rate, only_bb = float(white_box_success), float(black_box_success), None
    if bb_rate > wb_rate + tol:
        extra = f" ({only_bb} samples fooled only by the black-box attack)" if only_bb is not None else ""
        msgs.append(
            f"black-box success rate {bb_rate:.1%} exceeds white-box {wb_rate:.1%}{extra}: a sign "
            f"of gradient masking; gradient-based robustness numbers are not trustworthy."
        )
    return _emit(msgs)


def run_checks(model: nn.Module, images: Tensor, labels: Tensor) -> list[str]:
    """:func:`check_outputs` and :func:`check_gradients` on one batch."""
    return check_outputs(model, images) + check_gradients(model, images, labels)
