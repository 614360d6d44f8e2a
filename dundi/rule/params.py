"""The two-step rule's parameters (Algorithm 1) and their defaults: declared here, once --
the request a caller makes (:class:`TwoStepRule`) and the rule an index resolves it to
(:class:`ResolvedRule`).

``n`` oracles per class take part in the fine step, ``m`` of them in the coarse step, which
keeps the ``k`` best classes. Every layer -- the index, the Python API, evaluation, serving,
the CLI and the Serve config -- takes its defaults from these names
(``tests/test_settings_once.py`` fails where a literal default is written instead).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dundi.errors import DundiError

if TYPE_CHECKING:  # annotations only: building the CLI parser must not import numpy
    import numpy as np

ORACLES_PER_CLASS = 20   # n at `index build`: the paper's largest database (Table 1)
COARSE_ORACLES = 3       # m: the paper's coarse step; never more than n (see coarse_default)
KEPT_CLASSES = 5         # k: classes the coarse step keeps


def coarse_default(n: int) -> int:
    """m when none is given: the paper's 3, or n when the index holds fewer (n = 1 in Table 1)."""
    return min(COARSE_ORACLES, n)


METRICS = ("euclidean", "sqeuclidean")  # the distances' names (dundi.rule.distance)
DEFAULT_METRIC = "euclidean"             # the paper's; certified runs choose sqeuclidean


def check_metric(metric: str) -> str:
    """Refuse an unknown distance name with the accepted ones."""
    if metric not in METRICS:
        raise DundiError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    return metric


def _check_counts(n: int | None, m: int | None, k: int | None) -> None:
    for name, value in (("n", n), ("m", m), ("k", k)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DundiError(f"{name}={value!r} must be a whole number of at least 1")
    if n is not None and m is not None and m > n:
        raise DundiError(f"m={m} must be between 1 and n={n} (the coarse step's oracles "
                         f"per class are the first m of the fine step's n)")


@dataclass(frozen=True)
class TwoStepRule:
    """The rule a caller asks for (Algorithm 1): ``n`` oracles per class in the fine step, the
    first ``m`` of them in the coarse step, which keeps the ``k`` best classes.

    ``None`` means "not chosen": ``n`` every oracle the index holds per class, ``m`` min(3, n).
    The distance is the oracle set's, not the caller's. A request answers nothing by itself:
    :meth:`dundi.rule.index.OracleIndex.resolve` turns it into the :class:`ResolvedRule` every
    consumer takes.
    """

    n: int | None = None
    m: int | None = None
    k: int = KEPT_CLASSES

    def __post_init__(self) -> None:
        _check_counts(self.n, self.m, self.k)

    def at_n(self, n: int) -> "TwoStepRule":
        """The same request with ``n`` oracles in the fine step and a chosen m clamped to n
        (Table 1 and Fig. 7 evaluate one rule at several n)."""
        return TwoStepRule(n, None if self.m is None else min(self.m, n), self.k)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_BY_THE_INDEX = object()  # what only OracleIndex.resolve hands to ResolvedRule


@dataclass(frozen=True)
class ResolvedRule:
    """The rule an index answers: concrete ``n``, ``m``, ``k`` and the index's ``distance``
    (a :class:`dundi.rule.distance.Distance`).

    Made by :meth:`dundi.rule.index.OracleIndex.resolve` only (anything else is refused), so
    a value of this type has been checked against an oracle set: n no more than its classes
    hold, k no more than its classes, m = min(3, n) where the request left it open. Every
    consumer -- the exact rule, the certificate, the reference, the stand-ins and threat
    models, training's validation, serving -- takes it as it is.
    """

    n: int
    m: int
    k: int
    distance: "Distance"  # noqa: F821 -- dundi.rule.distance.Distance (which imports this module)
    _maker: object = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._maker is not _BY_THE_INDEX:
            raise TypeError("a ResolvedRule is made by OracleIndex.resolve(request) only")
        _check_counts(self.n, self.m, self.k)

    @property
    def metric(self) -> str:
        """The distance's name: for the edges (run.json, HTTP, reports) only."""
        return self.distance.name

    @property
    def request(self) -> TwoStepRule:
        """The fully specified request this rule answers (to resolve on another index)."""
        return TwoStepRule(self.n, self.m, self.k)

    def __reduce__(self):  # unpickled (a Ray worker) as the index made it
        return (_remade, (self.n, self.m, self.k, self.distance))

    def as_dict(self) -> dict:
        """n, m, k and the metric's name, as run.json, reports and the HTTP API write them."""
        return {"n": self.n, "m": self.m, "k": self.k, "metric": self.metric}


def _remade(n: int, m: int, k: int, distance) -> ResolvedRule:
    return ResolvedRule(n, m, k, distance, _BY_THE_INDEX)


def _resolve(request: TwoStepRule, index_n: int, distance) -> ResolvedRule:
    """The request on an oracle set holding at most ``index_n`` per class (no range checks:
    :meth:`dundi.rule.index.OracleIndex.resolve` makes them and is this function's one caller)."""
    n = index_n if request.n is None else request.n
    m = coarse_default(n) if request.m is None else request.m
    return ResolvedRule(n, m, request.k, distance, _BY_THE_INDEX)


@dataclasses.dataclass
class TwoStepResult:
    """Per query: the label, the classes kept by step 1 with their coarse scores (best first),
    the fine scores of those classes (same order), and the distance to the nearest oracle
    among the kept classes' n oracles."""

    labels: np.ndarray          # (B,) int64
    topk_classes: np.ndarray    # (B, k) int64
    coarse_scores: np.ndarray   # (B, k) float64
    fine_scores: np.ndarray     # (B, k) float64
    nearest_distance: np.ndarray  # (B,) float64
