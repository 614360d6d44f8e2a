"""The oracle database's storage: every class's oracle embeddings in one class-major array.

Class ``c`` owns rows ``offsets[c]`` to ``offsets[c+1]`` in the order they were given, so its
first ``m`` are its coarse oracles and a class is one contiguous block, read directly (never
through FAISS ID selectors, which GPU indexes silently ignore). Squared norms are kept beside
the rows for the gathered distances of :mod:`dundi.rule.search`.

Enrolment appends a class's rows into spare capacity (the buffer grows by at least a quarter,
so repeated enrolment copies the database O(log) times, not once per class); removal copies
the rows without the class. Names, labels and the search structures belong to
:class:`dundi.rule.index.OracleIndex`, which owns one :class:`OracleRows`.
"""

from __future__ import annotations

import numpy as np

from dundi.errors import DundiError


def split_counts(vectors: np.ndarray, num_classes: int | None, counts) -> np.ndarray:
    """Per-class oracle counts: given, or ``num_classes`` equal blocks; refused if they do not
    split ``vectors``."""
    if vectors.ndim != 2:
        raise DundiError(f"oracle vectors must be a (count, dim) array; got shape {vectors.shape}")
    if counts is None:
        if not num_classes or len(vectors) % num_classes:
            raise DundiError(f"oracle vectors of shape {vectors.shape} do not split into "
                             f"{num_classes} equal class blocks")
        return np.full(num_classes, len(vectors) // num_classes, np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or len(counts) == 0 or counts.min() < 1 or counts.sum() != len(vectors) \
            or (num_classes is not None and num_classes != len(counts)):
        raise DundiError(f"oracle counts {counts.tolist()[:20]} must be >= 1 per class and add up "
                         f"to the {len(vectors)} oracle vectors")
    return counts


class OracleRows:
    """Class-major oracle rows with per-class counts and offsets (see the module doc)."""

    def __init__(self, vectors: np.ndarray, counts: np.ndarray):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.dim = vectors.shape[1]
        self._vec, self._size = vectors, len(vectors)
        self._sq = np.einsum("ij,ij->i", vectors, vectors)  # no (N, D) temporary
        self._set_counts(np.asarray(counts, dtype=np.int64))

    def _set_counts(self, counts: np.ndarray) -> None:
        self.counts = counts
        self.uniform = bool(counts.min() == counts.max())  # equal blocks: (C, n, D) views
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def size(self) -> int:
        return self._size

    @property
    def vectors(self) -> np.ndarray:
        """All rows (N, D), class-major (a view; do not modify)."""
        return self._vec[:self._size]

    @property
    def buffer(self) -> np.ndarray:
        """The row buffer itself (rows past ``size`` are spare capacity): for gathers by row number."""
        return self._vec

    @property
    def sq_norms(self) -> np.ndarray:
        """Squared norms of the buffer's rows (same length as :attr:`buffer`)."""
        return self._sq

    def class_block(self, label: int) -> np.ndarray:
        """One class's rows (count, D) (a view)."""
        return self._vec[self.offsets[label]:self.offsets[label + 1]]

    def rows(self, classes: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row numbers (..., length) of each class's first min(length, count) oracles, padded
        with its last such row; the mask of real ones; and min(length, count) (...)."""
        eff = np.minimum(self.counts[classes], length)
        j = np.arange(length)
        rows = self.offsets[classes][..., None] + np.minimum(j, eff[..., None] - 1)
        return rows, j < eff[..., None], eff

    def centroids(self, m: int, classes: np.ndarray) -> np.ndarray:
        """Mean of each class's first min(m, count) oracles (len(classes), D), one oracle
        position at a time so no (C, m, D) copy is made."""
        rows, mask, eff = self.rows(classes, m)
        acc = np.zeros((len(classes), self.dim), np.float64)
        for j in range(m):
            acc += self._vec[rows[:, j]] * mask[:, j, None]
        return np.ascontiguousarray(acc / eff[:, None], dtype=np.float32)

    def first_n(self, n: int) -> np.ndarray:
        """(C, n, D): every class's first n rows (a copy); every class must hold n."""
        return self._vec[self.offsets[:-1, None] + np.arange(n)[None, :]]

    # ---- enrolment ---------------------------------------------------------------------
    def append_class(self, emb: np.ndarray) -> None:
        """A new class's rows (count, D) after the others."""
        need = self._size + len(emb)
        if need > len(self._vec):  # the caller's array or a full buffer: never written into
            cap = max(need, self._size + self._size // 4 + 64)
            vec, sq = np.empty((cap, self.dim), np.float32), np.empty(cap, np.float32)
            vec[:self._size], sq[:self._size] = self._vec[:self._size], self._sq[:self._size]
            self._vec, self._sq = vec, sq
        self._vec[self._size:need] = emb
        self._sq[self._size:need] = np.einsum("ij,ij->i", emb, emb)
        self._size = need
        self._set_counts(np.append(self.counts, len(emb)))

    def remove_class(self, label: int) -> None:
        """Drop one class's rows; the classes after it move down one label (a copy of the rows)."""
        a, b = self.offsets[label], self.offsets[label + 1]
        keep = np.r_[0:a, b:self._size]
        self._vec, self._sq, self._size = self._vec[keep], self._sq[keep], len(keep)
        self._set_counts(np.delete(self.counts, label))


def checked_embeddings(name: str, embeddings: np.ndarray, dim: int) -> np.ndarray:
    """A class's enrolment embeddings as a (count, D) float32 array, or one clear refusal."""
    try:
        emb = np.asarray(embeddings, dtype=np.float32)
    except (TypeError, ValueError):
        raise DundiError(f"embeddings for class {name!r} are not a numeric array") from None
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise DundiError(f"embeddings for class {name!r} have shape {emb.shape}; this index "
                         f"takes (count, {dim}): embed the images with the run's model")
    if len(emb) == 0:
        raise DundiError(f"no embeddings for class {name!r}: enrol a class from at least one image")
    if not np.isfinite(emb).all():
        raise DundiError(f"embeddings for class {name!r} hold NaN or Inf values; check the "
                         f"images (finite pixels in [0, 1]) and the model")
    return np.ascontiguousarray(emb)
