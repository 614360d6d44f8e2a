"""APGD on step 1 of DunDi's two-step rule: push the true class out of the top k."""

from __future__ import annotations

from torch import Tensor, nn

from .apgd import APGD


def coarse_margin(coarse: Tensor, labels: Tensor, k: int) -> Tensor:
    """Per sample: the k-th highest coarse score among the other classes minus the true
    class's. Positive means at least k other classes rank above the true one, so step 1
    drops it and no fine score can bring it back."""
    if k >= coarse.shape[1]:
        raise ValueError(f"step 1 keeps every class (k={k} of {coarse.shape[1]}): there is nothing to push out")
    others = coarse.scatter(1, labels[:, None], float("-inf"))
    return others.topk(k, dim=1).values[:, k - 1] - coarse.gather(1, labels[:, None]).squeeze(1)


class APGDStep1(APGD):
    r"""APGD (:class:`~dundi.attacks.apgd.APGD`: step-size schedule, momentum, restarts)
    climbing :func:`coarse_margin` — an attack on step 1 of Algorithm 1 alone: an input
    whose true class leaves the top k of the coarse ranking is misclassified whatever its
    fine score, a way in that the fine-score stand-in does not see.

    Distance measure: Linf. The model must expose ``coarse_scores_and_labels(x)`` and ``k``
    (DunDi's adaptive stand-in, :class:`dundi.rule.reference.TwoStepScorer`); success is the
    deployed rule's label. Needs k below the number of classes.

    Arguments: eps, steps, restarts, rho, seed, device as :class:`~dundi.attacks.apgd.APGD`
    (defaults 0.3, 100, 1, 0.75, 0).

    Example::

        >>> adv = APGDStep1(stand_in, eps=0.3, steps=100)(images, labels)
    """

    name = "apgd-step1"
    stand_in_only = True  # it attacks step 1 of DunDi's two-step rule
    losses = ("coarse-margin",)
    fixed_settings = {"loss": "coarse-margin"}

    def __init__(self, model: nn.Module, eps: float = 0.3, steps: int = 100, restarts: int = 1,
                 rho: float = 0.75, seed: int = 0, device=None):
        super().__init__(model, eps, steps, restarts, "coarse-margin", rho, seed, device)

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """Whether ``model`` is a two-step stand-in whose step 1 drops classes."""
        fn = getattr(model, "coarse_scores_and_labels", None)
        oracles = getattr(model, "oracles", None)
        return fn is not None and oracles is not None and getattr(model, "k", 0) < oracles.shape[0]

    def _loss_and_labels(self, x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        fn = getattr(self.model, "coarse_scores_and_labels", None)
        if fn is None:
            raise ValueError("apgd-step1 attacks step 1 of DunDi's two-step rule: it needs the "
                             "adaptive threat model's stand-in")
        coarse, decided = fn(x)
        return coarse_margin(coarse, y, self.model.k), decided
