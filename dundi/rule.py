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

if TYPE_CHECKING:  # annotations only: building the CLI parser must not import numpy
    import numpy as np

ORACLES_PER_CLASS = 20   # n at `index build`: the paper's largest database (Table 1)
COARSE_ORACLES = 3       # m: the paper's coarse step; never more than n (see coarse_default)
KEPT_CLASSES = 5         # k: classes the coarse step keeps


def coarse_default(n: int) -> int:
    """m when none is given: the paper's 3, or n when the index holds fewer (n = 1 in Table 1)."""
    return min(COARSE_ORACLES, n)


@dataclass(frozen=True)
class TwoStepParams:
    """One setting of the rule. ``n`` None: every oracle of the index; ``m`` None: min(3, n)."""

    n: int | None = None
    m: int | None = None
    k: int = KEPT_CLASSES

    def resolved(self, index_n: int) -> "TwoStepParams":
        """The concrete (n, m, k) on an index that holds ``index_n`` oracles per class."""
        n = index_n if self.n is None else self.n
        return TwoStepParams(n, coarse_default(n) if self.m is None else self.m, self.k)


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
