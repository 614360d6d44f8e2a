"""Algorithm 1's two steps over the oracle rows, as free functions over plain arrays.

:class:`dundi.rule.index.OracleIndex` picks the path by size and caches step 1's structure;
the arithmetic is here. Scores are Algorithm 1's: a class's summed similarity (negative
distance) over its first n (step 2) or m (step 1) oracles, rescaled to that many terms (mean
times n, resp. m) only for a class holding fewer (see the index's module doc). Ties break
towards the lower class index in step 1 and towards the better step-1 rank in step 2.

* :func:`full_step`: both steps from one exact FAISS distance matrix (few oracles in all).
* :func:`listed_step`: step 1 through :func:`coarse_structure` (exact over every class's
  coarse oracles while they are few, else a FAISS shortlist over class centroids), step 2
  over the kept classes' rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dundi.rule.oracle_rows import OracleRows
from dundi.rule.params import TwoStepResult
from dundi.rule.distance import Distance
from dundi.rule.search import Shortlister, gathered, top_k


def class_scores_from(dist: np.ndarray, mask: np.ndarray, eff: np.ndarray, length: int) -> np.ndarray:
    """Algorithm 1's class scores from per-oracle distances (..., L) of which ``mask`` marks
    the class's first ``eff`` = min(length, count): the summed similarity, rescaled to
    ``length`` terms (mean × length) only for a class holding fewer than ``length``."""
    s = -np.where(mask, dist, 0.0).sum(-1, dtype=np.float64)
    return np.where(eff < length, s * length / np.maximum(eff, 1), s)


def block_reductions(d3: np.ndarray, n: int, m: int) -> tuple[np.ndarray, ...]:
    """Coarse sums (first m), fine sums (first n) and minima (first n) per class of equal
    class blocks (B, C, n_max), in one pass over oracle positions: NumPy reduces a short last
    axis slowly, and at 10 classes these reductions would cost more than the distances.
    float32, like FAISS's distances; added in oracle order, so equal rows give equal sums."""
    total, low = d3[:, :, 0].copy(), d3[:, :, 0].copy()
    coarse = total.copy() if m == 1 else None
    for j in range(1, n):
        total += d3[:, :, j]
        np.minimum(low, d3[:, :, j], out=low)
        if j == m - 1:
            coarse = total.copy()
    return -coarse, -total, low


@dataclasses.dataclass(frozen=True)
class PackedCoarse:
    """Every class's first min(m, count) oracles packed together, for an exact step 1:
    ``pos`` (C, m) indexes ``vectors`` per class (padded with its last), ``mask`` marks the
    real ones, ``eff`` counts them."""

    vectors: np.ndarray
    pos: np.ndarray
    mask: np.ndarray
    eff: np.ndarray


def coarse_structure(rows: OracleRows, m: int, exact_limit: int, kind: str,
                     nprobe: int | None) -> PackedCoarse | Shortlister:
    """Step 1's structure for m: the packed coarse oracles while they number at most
    ``exact_limit``, else a ``kind`` shortlister over per-class coarse centroids."""
    classes = np.arange(len(rows.counts))
    r, mask, eff = rows.rows(classes, m)
    if int(eff.sum()) <= exact_limit:
        packed = np.concatenate([[0], np.cumsum(eff)])[:-1]
        pos = packed[:, None] + np.minimum(np.arange(m), eff[:, None] - 1)
        return PackedCoarse(np.ascontiguousarray(rows.buffer[r[mask]]), pos, mask, eff)
    return Shortlister(rows.centroids(m, classes), kind, nprobe=nprobe)


def step1(q: np.ndarray, rows: OracleRows, structure: PackedCoarse | Shortlister, m: int, k: int,
          distance: Distance, shortlist: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k classes (B, k) and their coarse scores over the first min(m, count) oracles;
    -1 marks a class the shortlist could not fill."""
    if isinstance(structure, PackedCoarse):
        scores = class_scores_from(distance.pairwise(q, structure.vectors)[:, structure.pos],
                                   structure.mask, structure.eff, m)
        top = top_k(scores, k)
        return top, np.take_along_axis(scores, top, 1)
    num_classes = len(rows.counts)
    cand = structure.search(q, min(num_classes, shortlist or max(8 * k, 64)))
    cand = np.sort(cand, axis=1)  # -1 (a missing hit) first; ties then go to the lower class
    r, mask, eff = rows.rows(np.maximum(cand, 0), m)
    dist = distance.finish(gathered(q, rows.buffer, rows.sq_norms, r))
    scores = np.where(cand < 0, -np.inf, class_scores_from(dist, mask, eff, m))
    top = top_k(scores, k)
    return np.take_along_axis(cand, top, 1), np.take_along_axis(scores, top, 1)


def full_step(q: np.ndarray, rows: OracleRows, n: int, m: int, k: int,
              distance: Distance) -> tuple[np.ndarray, ...]:
    """Both steps from one exact FAISS distance matrix, so the two-step rule costs about what
    flat search costs. Equal class blocks are read as a (B, C, n) view: no gather, no mask.
    Returns (top classes, coarse scores, fine scores, nearest oracle distance)."""
    dist = distance.pairwise(q, rows.vectors)
    num_classes = len(rows.counts)
    if rows.uniform:
        coarse, fine, nearest = block_reductions(dist.reshape(len(q), num_classes, -1), n, m)
        top = top_k(coarse, k)
        return (top, np.take_along_axis(coarse, top, 1).astype(np.float64),
                np.take_along_axis(fine, top, 1).astype(np.float64),
                np.take_along_axis(nearest, top, 1).min(1))
    r, mask, eff = rows.rows(np.arange(num_classes), m)
    coarse = class_scores_from(dist[:, r], mask, eff, m)
    top = top_k(coarse, k)
    r, mask, eff = rows.rows(top, n)
    fine_dist = np.take_along_axis(dist, r.reshape(len(q), -1), 1).reshape(r.shape)
    return (top, np.take_along_axis(coarse, top, 1), class_scores_from(fine_dist, mask, eff, n),
            np.where(mask, fine_dist, np.inf).min(axis=(1, 2)))


def listed_step(q: np.ndarray, rows: OracleRows, structure: PackedCoarse | Shortlister, n: int,
                m: int, k: int, distance: Distance, shortlist: int | None) -> tuple[np.ndarray, ...]:
    """Step 1 through its structure, step 2 over the kept classes' rows (as :func:`full_step`)."""
    top, coarse_scores = step1(q, rows, structure, m, k, distance, shortlist)
    r, mask, eff = rows.rows(np.maximum(top, 0), n)  # the shortlist may miss (-1)
    fine_dist = distance.finish(gathered(q, rows.buffer, rows.sq_norms, r))
    mask = mask & (top[:, :, None] >= 0)
    fine = np.where(top >= 0, class_scores_from(fine_dist, mask, eff, n), -np.inf)
    return top, coarse_scores, fine, np.where(mask, fine_dist, np.inf).min(axis=(1, 2))


def answer(top: np.ndarray, coarse: np.ndarray, fine: np.ndarray, nearest: np.ndarray,
           distance: Distance) -> TwoStepResult:
    """The step outputs as a :class:`TwoStepResult`: the label is the kept class with the best
    fine score (the first maximum: ties go to the better coarse rank); the nearest oracle is
    reported as a distance whatever the metric ranks by."""
    nearest = distance.euclidean_of(nearest)
    best = np.argmax(fine, axis=1)
    labels = top[np.arange(len(top)), best]
    return TwoStepResult(labels.astype(np.int64), top.astype(np.int64), coarse, fine, nearest)
