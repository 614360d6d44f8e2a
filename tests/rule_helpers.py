"""Tests' one way to turn raw oracle arrays into the oracle set the rule's consumers take: an
:class:`OracleIndex` over them, which resolves the request (nothing else may)."""

from __future__ import annotations

import numpy as np

from dundi.rule.index import OracleIndex
from dundi.rule.params import DEFAULT_METRIC, ResolvedRule, TwoStepRule


def index_of(oracles, metric: str = DEFAULT_METRIC, counts=None) -> OracleIndex:
    """The index over oracles (C, n, D) (array or tensor); with ``counts``, class c keeps its
    first counts[c] rows only."""
    o = np.asarray(oracles.detach().cpu().numpy() if hasattr(oracles, "detach") else oracles, np.float32)
    if counts is None:
        return OracleIndex(o.reshape(-1, o.shape[-1]), len(o), metric=metric)
    rows = np.concatenate([o[c, :int(counts[c])] for c in range(len(o))])
    return OracleIndex(rows, counts=[int(c) for c in counts], metric=metric)


def resolved(oracles, request: TwoStepRule | None = None, metric: str = DEFAULT_METRIC,
             counts=None) -> ResolvedRule:
    """``request`` as the index over ``oracles`` resolves it."""
    return index_of(oracles, metric, counts).resolve(request)


def certifier(net, oracles, request: TwoStepRule | None = None):
    """The Certifier of ``net`` with the squared-Euclidean index over ``oracles`` (C, n, D),
    under ``request`` as that index resolves it."""
    from dundi.robustness.certificate import Certifier

    index = index_of(oracles, "sqeuclidean")
    return Certifier(net, index, index.resolve(request))
