"""The distance the two-step rule ranks by, as an object on the oracle set.

Why objects, not a string or a flag: the metric used to travel in three forms -- a name, a
``squared`` flag on the index and a ``squared`` property of the rule -- and every consumer
turned one into another. As pytorch-metric-learning passes ``Distance`` objects, the index
holds one :class:`Distance` and the resolved rule carries it; numpy code (the index's FAISS
path) and torch code (the reference, the stand-ins) call its forms. The name
(``"euclidean"``, ``"sqeuclidean"``) is read only at the edges -- flags, run.json, HTTP -- and
turned into the object once, by :func:`distance_named`.

No torch import here: the torch forms call tensor methods, so the index stays torch-free.
"""

from __future__ import annotations

import numpy as np

from dundi.rule.params import DEFAULT_METRIC, check_metric


class Distance:
    """One distance between embeddings: ``name`` (the edge's string), ``squared`` (whether it
    is the squared Euclidean distance, under which the rule is linear in the oracles' sums
    and so certifiable), and its numpy and torch forms from squared distances."""

    name: str
    squared: bool

    @property
    def certifiable(self) -> bool:
        """Whether the certificate's linear form (docs/certification.md) applies."""
        return self.squared

    # ---- numpy (the index) ---------------------------------------------------------------
    def finish(self, d2: np.ndarray) -> np.ndarray:
        """This distance from squared distances as computed (clipped at 0; in place)."""
        d2 = np.maximum(d2, 0.0, out=d2)
        return d2 if self.squared else np.sqrt(d2, out=d2)

    def pairwise(self, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """(B, N) distances of float32 queries to float32 vectors, computed by FAISS."""
        from dundi.rule.search import squared_pairwise

        return self.finish(squared_pairwise(queries, vectors))

    def euclidean_of(self, values: np.ndarray) -> np.ndarray:
        """The Euclidean distance of values in this distance (the nearest oracle is reported as
        a distance whatever the rule ranks by)."""
        values = np.asarray(values, dtype=np.float64)
        return np.sqrt(values) if self.squared else values

    # ---- torch (the reference and the stand-ins) -------------------------------------------
    def torch_finish(self, d2, eps: float = 0.0):
        """This distance from a tensor of squared distances; ``eps`` keeps the square root
        differentiable at 0."""
        return d2 if self.squared else (d2 + eps).sqrt()

    def torch_of_diff(self, diff, eps: float = 0.0):
        """Distances along the last axis of a tensor of embedding differences."""
        return self.torch_finish((diff ** 2).sum(-1), eps)

    def torch_pairwise(self, queries, vectors, eps: float = 0.0, dots=None, sq_norms=None):
        """(B, N) distances through one matrix product, ‖q‖² + ‖o‖² − 2 q·o (clipped at 0).
        ``dots`` (B, N) and ``sq_norms`` (N,), where given, are that product and the vectors'
        squared norms as the caller computes them (the stand-in's batch-invariant product)."""
        dots = queries @ vectors.T if dots is None else dots
        sq_norms = (vectors * vectors).sum(1) if sq_norms is None else sq_norms
        d2 = (queries * queries).sum(1, keepdim=True) + sq_norms - 2.0 * dots
        return self.torch_finish(d2.clamp_min(0.0), eps)

    def __repr__(self) -> str:
        return f"Distance({self.name})"

    def __reduce__(self):  # a Distance is one of the named singletons, pickled by name
        return (distance_named, (self.name,))


class Euclidean(Distance):
    """‖a − b‖₂: the paper's distance."""

    name, squared = "euclidean", False


class SquaredEuclidean(Distance):
    """‖a − b‖₂²: ranks like a linear classifier in the oracles' sums; the certifiable rule."""

    name, squared = "sqeuclidean", True


EUCLIDEAN, SQEUCLIDEAN = Euclidean(), SquaredEuclidean()
DISTANCES: dict[str, Distance] = {d.name: d for d in (EUCLIDEAN, SQEUCLIDEAN)}
DEFAULT_DISTANCE = DISTANCES[DEFAULT_METRIC]


def distance_named(name: str) -> Distance:
    """The :class:`Distance` of a metric's name (from a flag, run.json or a request), refusing
    an unknown one with the accepted names."""
    return DISTANCES[check_metric(name)]


__all__ = ["Distance", "EUCLIDEAN", "SQEUCLIDEAN", "DISTANCES", "DEFAULT_DISTANCE", "distance_named"]
