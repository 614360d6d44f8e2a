"""The small base every attack builds on.

An attack holds a model (any ``nn.Module`` mapping float32 NCHW images in [0, 1] to
``(N, num_classes)`` logits or scores, larger = more likely) and turns a batch of images
and their true labels into adversarial images:

    result = attack.run(images, labels)   # AttackResult(adv, steps)
    adv = attack(images, labels)          # just the adversarial images

What the base does, so that the attack files do not have to:

- runs the model in eval mode during the attack and restores every submodule's own
  train/eval flag afterwards (the caller's state is never changed permanently);
- moves the inputs to the attack's device (given, else the model's, else the images');
  results stay on that device;
- checks shapes, dtype and the [0, 1] range, and clamps the result to [0, 1];
- returns detached tensors.

Gradients are always taken with ``torch.autograd.grad`` with respect to the input only,
so an attack never writes into the model parameters' ``.grad``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AttackResult:
    """What :meth:`Attack.run` returns.

    adv:    (N, C, H, W) float32 adversarial images in [0, 1], detached.
    steps:  (N,) int64 per-sample work: iterations for iterative attacks (1 for FGSM),
            pixel-pair updates for JSMA, model queries for Square.
    target: (N,) int64 target classes for targeted attacks (JSMA), else None.
    """

    adv: Tensor
    steps: Tensor
    target: Tensor | None = None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own flag on exit.

    ``model.train(flag)`` alone would flatten mixed states (e.g. a frozen, eval-mode
    backbone inside a training model), so each module's flag is saved and restored.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer, or None if it has neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def margin(scores: Tensor, labels: Tensor) -> Tensor:
    """CW-style margin per sample: best other score minus the true-class score.

    Positive means misclassified. ``scores``: (N, K); ``labels``: (N,). Returns (N,).
    """
    true = scores.gather(1, labels[:, None]).squeeze(1)
    other = scores.scatter(1, labels[:, None], float("-inf")).amax(1)
    return other - true


def loss_per_sample(scores: Tensor, labels: Tensor, loss: str) -> Tensor:
    """Per-sample loss an untargeted attack maximises: ``"ce"`` or ``"margin"``."""
    if loss == "ce":
        return F.cross_entropy(scores, labels, reduction="none")
    if loss == "margin":
        return margin(scores, labels)
    raise ValueError(f"loss must be 'ce' or 'margin', got {loss!r}")


def scores_and_labels(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The model's scores at ``x`` and the labels that decide an attack's success there.

    A model may name its deployed decision with a ``scores_and_labels(x)`` method (DunDi's
    adaptive stand-in returns the real two-step rule's labels, computed from the same
    forward pass); otherwise the label is the argmax of the scores. Attacks use these labels
    for early stopping, restarts and black-box acceptance, so they stop on what is deployed,
    not on a surrogate. Builds a graph only when grad mode is on."""
    fn = getattr(model, "scores_and_labels", None)
    if fn is None:
        scores = model(x)
        return scores, scores.detach().argmax(1)
    return fn(x)


def project_linf(x: Tensor, x0: Tensor, eps: float | Tensor) -> Tensor:
    """Clip ``x`` into the Linf eps-ball around ``x0`` and into [0, 1]: the projection of
    every Linf attack (BIM, PGD, APGD). Written as min/max against ``x0 ± eps`` (not
    ``x0 + clamp(x - x0)``) so the result is bit-identical to torchattacks' BIM, which clips
    the same way; ``eps`` may be a per-sample tensor broadcasting against ``x``."""
    return torch.min(torch.max(x, x0 - eps), x0 + eps).clamp_(0.0, 1.0)


def grad_and_decision(model: nn.Module, x: Tensor, labels: Tensor, loss: str = "ce"
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`input_grad` plus the deciding labels at ``x`` (:func:`scores_and_labels`) from the
    same forward pass: for attacks that stop a sample once the deployed rule gets it wrong."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        scores, decided = scores_and_labels(model, x)
        total = loss_per_sample(scores, labels, loss).sum()
        (grad,) = torch.autograd.grad(total, x)
    return grad, scores.detach(), decided


def input_grad(model: nn.Module, x: Tensor, labels: Tensor, loss: str = "ce") -> tuple[Tensor, Tensor]:
    """Gradient of the summed per-sample loss w.r.t. ``x``, and the scores at ``x``.

    The sum (not the mean) keeps each sample's gradient independent of the batch size.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = model(x)
        total = loss_per_sample(scores, labels, loss).sum()
        (grad,) = torch.autograd.grad(total, x)
    return grad, scores.detach()


class Attack:
    """Base class: subclasses implement ``_run`` and declare what they are, so that the registry
    (:func:`dundi.attacks.make_attack`) and the evaluation read the facts from the attack
    instead of probing its constructor:

    ``name``        registry name;
    ``norm``        the distance the attack bounds or minimises: ``"linf"``, ``"l2"`` or ``"l0"``;
    ``budget_arg``  the constructor argument holding its budget in that norm (``"eps"``; JSMA:
                    ``"gamma"``, the fraction of pixels it may change), None if unbounded;
    ``steps_arg``   the constructor argument holding its iterations (``"steps"``, DeepFool's
                    ``"max_iter"``, Square's ``"n_queries"``), None if its work is fixed;
    ``seeded``      whether it draws random numbers from a ``seed`` argument;
    ``stand_in_only`` whether it only applies to DunDi's two-step stand-in;
    ``fixed_settings`` settings the class fixes rather than takes (BIM-A's early stop), so a
                    plan knows every setting the attack will hold without building it.

    Arguments:
        model (nn.Module): maps (N, C, H, W) images in [0, 1] to (N, K) logits/scores.
        device (torch.device | str | None): where to attack. Default: the model's
            device, else the images' device.
    """

    name: str = "attack"
    norm: str = "linf"
    budget_arg: str | None = "eps"
    steps_arg: str | None = "steps"
    seeded: bool = False
    stand_in_only: bool = False
    fixed_settings: dict[str, object] = {}

    def __init__(self, model: nn.Module, device: torch.device | str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.device = torch.device(device) if device is not None else None

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.forward(images, labels)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Adversarial images (N, C, H, W) in [0, 1], detached."""
        return self.run(images, labels).adv

    def run(self, images: Tensor, labels: Tensor, keys: Tensor | None = None) -> AttackResult:
        """Attack a batch: images (N, C, H, W) float in [0, 1], labels (N,) int64 true classes.

        ``keys`` (N,) int64, optional: a key per sample (its id in the dataset). A seeded attack
        then draws every sample's random numbers from a stream of its own
        (:class:`dundi.attacks.draws.SampleDraws`), so a sample gets the same numbers in any
        batch; without keys one generator serves the batch."""
        images, labels = self._prepare(images, labels)
        if keys is not None:
            keys = torch.as_tensor(keys, dtype=torch.int64)
            if keys.shape != labels.shape:
                raise ValueError(f"keys must have shape {tuple(labels.shape)}, got {tuple(keys.shape)}")
        self._keys = keys
        try:
            with eval_mode(self.model):
                result = self._run(images, labels)
        finally:
            self._keys = None
        adv = result.adv.detach().clamp_(0.0, 1.0)
        steps = result.steps.detach().to(device=adv.device, dtype=torch.int64)
        target = None if result.target is None else result.target.detach()
        return AttackResult(adv, steps, target)

    def _run(self, images: Tensor, labels: Tensor) -> AttackResult:
        raise NotImplementedError

    @property
    def budget(self) -> float:
        """The budget this attack enforces, in its norm; inf for an unbounded one."""
        return float("inf") if self.budget_arg is None else float(getattr(self, self.budget_arg))

    def configured_steps(self, num_features: int) -> int:
        """The most iterations (or queries) it may spend per sample; 1 for a one-step attack."""
        return 1 if self.steps_arg is None else int(getattr(self, self.steps_arg))

    @classmethod
    def options(cls) -> dict[str, object]:
        """Keyword → default of the constructor's settings (without model and device): what
        ``--attack-arg`` may set, and the type each expects."""
        import inspect

        params = inspect.signature(cls.__init__).parameters
        return {k: p.default for k, p in params.items() if k not in ("self", "model", "device")
                and p.kind is p.POSITIONAL_OR_KEYWORD}

    def _prepare(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if not torch.is_tensor(images) or images.dim() != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        labels = torch.as_tensor(labels)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        device = self.device or model_device(self.model) or images.device
        images = images.detach().to(device=device, dtype=torch.float32).clone()
        labels = labels.detach().to(device=device, dtype=torch.int64)
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError(
                f"images must be in [0, 1], got [{images.min().item():.3g}, {images.max().item():.3g}]"
            )
        return images, labels

    def _draws(self, device: torch.device):
        """This run's random numbers (:func:`dundi.attacks.draws.draws_for`): per sample where
        :meth:`run` got keys, else one generator seeded with ``self.seed``."""
        from .draws import draws_for

        return draws_for(self.seed, getattr(self, "_keys", None), device)

    def _scores(self, x: Tensor) -> Tensor:
        """Model scores without building a graph."""
        with torch.no_grad():
            return self.model(x)

    def _decide(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scores and deciding labels (:func:`scores_and_labels`) without building a graph."""
        with torch.no_grad():
            return scores_and_labels(self.model, x)

    @staticmethod
    def _check_labels(scores: Tensor, labels: Tensor) -> int:
        """Number of classes, read from the model output; validates the labels against it."""
        if scores.dim() != 2 or scores.shape[0] != labels.shape[0]:
            raise ValueError(f"model must return (N, num_classes) scores, got {tuple(scores.shape)}")
        k = scores.shape[1]
        if labels.numel() and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"labels must be in [0, {k}), got [{labels.min().item()}, {labels.max().item()}]")
        return k

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in ("model",) and not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def jacobian(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Scores (N, K), their Jacobian w.r.t. the input, (N, K, C*H*W), for all classes, and the
    deciding labels (:func:`scores_and_labels`) from the same forward pass.

    One forward pass, then all K vector-Jacobian products in one batched backward
    (``is_grads_batched``, i.e. vmap over the backward graph). Models whose backward has
    no batching rule fall back to K ordinary backward passes over the same graph. Both
    rely on samples being independent in eval mode, so that the gradient of
    ``scores[:, k].sum()`` w.r.t. ``x[n]`` is ``d scores[n, k] / d x[n]``.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        scores, decided = scores_and_labels(model, x)
        n, k = scores.shape
        eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
        try:
            (jac,) = torch.autograd.grad(
                scores, x, grad_outputs=eye[:, None, :].expand(k, n, k), is_grads_batched=True, retain_graph=True
            )
        except (RuntimeError, NotImplementedError):
            jac = torch.stack(
                [torch.autograd.grad(scores[:, c].sum(), x, retain_graph=c < k - 1)[0] for c in range(k)]
            )
    return scores.detach(), jac.reshape(k, n, -1).transpose(0, 1), decided
