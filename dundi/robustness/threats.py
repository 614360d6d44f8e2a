"""Threat models: which differentiable model an attack is run against.

DunDi itself is not differentiable end to end (Algorithm 1 sorts classes and FAISS searches),
so every threat model names a torch module returning (B, C) scores, larger = more likely, and
the attacks run against that module. The adversarial input is then always classified by the
real two-step rule (:meth:`dundi.run.directory.Run.classify`); the attack's success on its own
target is recorded beside it.

``transfer``  The paper's protocol (section 4.1, via Feinman et al. 2017): the attack sees only
              the native softmax model's logits; DunDi classifies what comes out. DunDi's
              weights are never looked at, so this measures transfer, not robustness.
``adaptive``  White-box against the rule as deployed: the Distance NN followed by
              :class:`dundi.rule.reference.TwoStepScorer` at the evaluation's (n, m, k) and metric —
              the fine scores of the classes step 1 keeps, every other class strictly below
              them, ties broken as Algorithm 1 breaks them — so its argmax *is* the two-step
              label for any k. Scores are divided by n (no argmax changes; keeps a
              cross-entropy out of float32 saturation). Given the FAISS index, attacks decide
              success (early stopping, restarts, Square's acceptance) by the real rule's label.
              The stand-in also exposes the coarse scores, which the step-1 attack
              (``apgd-step1``) climbs to push the true class out of the top k.
``adaptive-all`` The former adaptive scorer: s_c(x) = −mean_j ‖f(x) − o_cj‖ over the n oracles
              of every class (:class:`dundi.rule.reference.OracleScorer` divided by n). Its argmax
              is the two-step label only when step 1 keeps all classes (k = C).
``feature``   Feature-space attack: s_c(x) = −(mean distance from f(x) to the q nearest oracles
              of class c). An untargeted attack raises the scores of the other classes and
              lowers the true one, i.e. it pulls f(x) towards the nearest oracle embeddings of
              another class and away from its own; with a cross-entropy loss the pull goes
              mostly to the closest wrong class (softmax weights). Unlike ``adaptive`` it
              ignores all but the q nearest oracles, so it attacks the local geometry of the
              embedding rather than the sum Algorithm 1 ranks by.

``temperature`` divides every score (argmax unchanged). Larger values soften the softmax when
embedding distances are large and a cross-entropy gradient would underflow to zero; the
evaluation records the gradient norm per sample so vanishing gradients are reported.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dundi.errors import DundiError
from dundi.rule.params import ResolvedRule
from dundi.rule.reference import OracleScorer, TwoStepScorer

THREATS = ("transfer", "adaptive", "adaptive-all", "feature")


class ScaledScores(nn.Module):
    """``module(x) / scale`` — a positive rescaling that keeps every argmax."""

    def __init__(self, module: nn.Module, scale: float):
        super().__init__()
        if not scale > 0:
            raise DundiError(f"score scale must be positive, got {scale}")
        self.module = module
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) / self.scale


class FeatureScorer(nn.Module):
    """s_c(x) = −mean of the ``nearest`` smallest distances ‖f(x) − o_cj‖ over class c's oracles
    ``oracles`` (C, n, D), divided by ``temperature``. ``nearest=1`` is the distance to the
    single nearest oracle of each class."""

    def __init__(self, distance_net: nn.Module, oracles: torch.Tensor, nearest: int = 3,
                 temperature: float = 1.0, eps: float = 1e-12):
        super().__init__()
        if oracles.ndim != 3:
            raise DundiError(f"oracles must be (classes, n, dim); got {tuple(oracles.shape)}")
        if not 1 <= nearest <= oracles.shape[1]:
            raise DundiError(f"nearest={nearest} must be between 1 and n={oracles.shape[1]}")
        self.distance_net = distance_net
        self.register_buffer("oracles", oracles.float())
        self.nearest = nearest
        self.temperature = float(temperature)
        self.eps = eps

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, n) distances from f(x) to every oracle."""
        emb = self.distance_net(x)
        diff = emb[:, None, None, :] - self.oracles[None]
        return torch.sqrt((diff ** 2).sum(-1) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        near = torch.topk(self.distances(x), self.nearest, dim=-1, largest=False).values
        return -near.mean(-1) / self.temperature


@dataclasses.dataclass
class ThreatModel:
    name: str
    model: nn.Module      # what the attack differentiates / queries: (B, C) scores
    target: str           # short description of that model, stored in every result row


def build_threat(name: str, *, native: nn.Module | None = None, distance_net: nn.Module | None = None,
                 oracles: torch.Tensor | None = None, temperature: float = 1.0,
                 nearest: int = 3, rule: ResolvedRule | None = None, judge=None,
                 counts=None) -> ThreatModel:
    """The attacked model for a threat model. ``oracles`` is (C, n, D) — the index's padded
    view of the n oracles the two-step ``rule`` uses in the evaluation (the
    :class:`ResolvedRule` the index resolved: its distance is the oracle set's), ``counts``
    the oracles each class holds, and ``judge`` (embeddings → labels) the deployed rule, for
    the ``adaptive`` stand-in. Every
    returned module is in eval mode with frozen parameters (attacks differentiate with respect
    to the input only), and runs the networks through :class:`dundi.nets.invariant.InvariantForward`,
    so a sample's scores and gradients -- and so its attack -- do not depend on the batch or the
    thread count it is computed with."""
    from dundi.nets.invariant import invariant

    native, distance_net = invariant(native), invariant(distance_net)
    if name == "transfer":
        if native is None:
            raise DundiError("the transfer threat model needs the native run (--native)")
        model, target = ScaledScores(native, temperature), "native logits"
    elif name in ("adaptive", "adaptive-all", "feature"):
        if distance_net is None or oracles is None or rule is None:
            raise DundiError(f"the {name} threat model needs the DunDi run, its oracle index and the "
                             f"rule the index resolved")
        n = oracles.shape[1]
        if name == "adaptive":
            model = TwoStepScorer(distance_net, oracles, rule, n * temperature, judge, counts=counts)
            target = (f"DunDi two-step stand-in (n={n}, m={rule.m}, k={rule.k}, {rule.metric}): fine "
                      f"scores of the top-k classes, the others below")
        elif name == "adaptive-all":
            model = ScaledScores(OracleScorer(distance_net, oracles, rule.distance), n * temperature)
            target = f"DunDi scorer: −mean distance to the n={oracles.shape[1]} oracles of each class"
        else:
            q = min(nearest, oracles.shape[1])
            model = FeatureScorer(distance_net, oracles, q, temperature)
            target = f"DunDi feature scorer: −mean distance to the {q} nearest oracles of each class"
    else:
        raise DundiError(f"unknown threat model {name!r}: choose from {', '.join(THREATS)}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return ThreatModel(name, model, target)


__all__ = ["THREATS", "ThreatModel", "build_threat", "FeatureScorer", "ScaledScores"]
