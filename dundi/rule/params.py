"""The two-step rule's parameters (Algorithm 1) and their defaults: declared here, once.

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


METRICS = ("euclidean", "sqeuclidean")  # the distances an index can rank by


def check_metric(metric: str) -> str:
    """Refuse an unknown distance name with the accepted ones."""
    if metric not in METRICS:
        raise DundiError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    return metric


@dataclass(frozen=True)
class TwoStepRule:
    """Algorithm 1 as one value: ``n`` oracles per class in the fine step, the first ``m`` of
    them in the coarse step, which keeps the ``k`` best classes, all ranked by ``metric``.

    Why one object: the index, ``Run.classify``, the server's model config, the evaluation,
    the attacks' stand-in and the certificate all apply this rule; each used to re-derive n, m,
    k and the metric (with three different defaults for m). ``None`` means "not chosen":
    ``n`` every oracle the index holds per class, ``m`` min(3, n), ``metric`` the index's.
    :meth:`resolved` fills them in once, against an index; everything downstream of it reads
    concrete values.
    """

    n: int | None = None
    m: int | None = None
    k: int = KEPT_CLASSES
    metric: str | None = None

    def __post_init__(self) -> None:
        for name in ("n", "m", "k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DundiError(f"{name}={value!r} must be a whole number of at least 1")
        if self.n is not None and self.m is not None and self.m > self.n:
            raise DundiError(f"m={self.m} must be between 1 and n={self.n} (the coarse step's oracles "
                             f"per class are the first m of the fine step's n)")
        if self.metric is not None:
            check_metric(self.metric)

    def resolved(self, index_n: int, metric: str | None = None) -> "TwoStepRule":
        """The concrete rule on an index holding ``index_n`` oracles per class and ranking by
        ``metric``: n, m and the metric filled in where they were left open. A rule that names
        another metric than the index's is refused (the index's distances are in its own)."""
        if metric is not None and self.metric not in (None, metric):
                raise DundiError(f"the rule ranks by {self.metric} distance but the index by {metric}: "
                             f"leave the metric to the index")
        n = index_n if self.n is None else self.n
        return TwoStepRule(n, coarse_default(n) if self.m is None else self.m, self.k,
                           metric if self.metric is None else self.metric)

    def at_n(self, n: int) -> "TwoStepRule":
        """The same rule with ``n`` oracles in the fine step and m clamped to n, resolved the
        same way (Table 1 and Fig. 7 evaluate one rule at several n)."""
        return TwoStepRule(n, None if self.m is None else min(self.m, n), self.k, self.metric)

    @property
    def is_resolved(self) -> bool:
        return self.n is not None and self.m is not None and self.metric is not None

    @property
    def squared(self) -> bool:
        """Whether the rule ranks by squared Euclidean distance (the certifiable rule)."""
        return self.metric == "sqeuclidean"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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
