"""Candidate abstain signals from the OOD literature, measured by the abstain benchmark
(bench/abstain.py) alone and inside the selective rule, and not served unless they earn it:

- ``mahalanobis``: the smallest Mahalanobis distance of the embedding to the class means under
  one tied covariance (Lee et al. 2018), fitted on the run's training embeddings;
- ``relative mahalanobis``: that minus the distance to one Gaussian of all training
  embeddings (Ren et al. 2021), which discounts directions every class varies along;
- ``energy``: the free energy -log sum_c exp(f_c) of the per-oracle fine scores f_c of the kept
  classes (Liu et al. 2020; DunDi's fine score is minus a distance sum, so no logit is needed);
- ``knn embedding``: the distance of the L2-normalised embedding to its k-th nearest normalised
  training embedding (Sun et al. 2022);
- ``knn pixels``: the Euclidean distance of the image, rescaled to its own [min, max], to its
  nearest training digit rescaled alike (blind to contrast and brightness).

Every value is oriented larger = more unusual. The reference is fitted on the training part of
the run's train split (never the held-out images the rule is calibrated on, never the test
split): the first REFERENCE_SIZE images of that part in a seeded order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REFERENCE_SIZE = 3000
KNN_K = 10          # Sun et al.'s k for the embedding kNN (their CIFAR-10 setting scaled down)
RIDGE = 1e-3        # added to the covariance's diagonal: 3,000 samples of up to 128 dimensions
CANDIDATES = ("mahalanobis", "relative mahalanobis", "energy", "knn embedding", "knn pixels")


@dataclass(frozen=True)
class Reference:
    """What the candidates compare against, all from training images."""

    means: np.ndarray         # (C, D) class means of the embeddings
    precision: np.ndarray     # (D, D) inverse of the tied (within-class) covariance
    mean_all: np.ndarray      # (D,) mean of all embeddings
    precision_all: np.ndarray  # (D, D) inverse of their covariance
    unit: np.ndarray          # (N, D) normalised embeddings
    pixels: np.ndarray        # (N, P) images rescaled to their own range


def _precision(residual: np.ndarray) -> np.ndarray:
    cov = residual.T @ residual / len(residual)
    return np.linalg.inv(cov + RIDGE * np.eye(cov.shape[0]))


def _unit(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def rescaled(images: np.ndarray) -> np.ndarray:
    """(B, P) each image mapped linearly onto [0, 1] by its own darkest and brightest pixel
    (a constant image maps to 0)."""
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    lo, hi = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    return (flat - lo) / np.maximum(hi - lo, 1e-6)


def fit_reference(images: np.ndarray, labels: np.ndarray, embeddings: np.ndarray) -> Reference:
    """The candidates' reference from training ``images``, their ``labels`` and embeddings."""
    z = np.asarray(embeddings, np.float64)
    classes = np.unique(labels)
    means = np.stack([z[labels == c].mean(0) for c in classes])
    within = z - means[np.searchsorted(classes, labels)]
    full = np.zeros((int(classes.max()) + 1, z.shape[1]))
    full[classes] = means
    full[np.setdiff1d(np.arange(len(full)), classes)] = np.inf   # absent classes: never nearest
    return Reference(full, _precision(within), z.mean(0), _precision(z - z.mean(0)), _unit(z), rescaled(images))


def _quadratic(z: np.ndarray, centre: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = z - centre
    return np.einsum("bi,ij,bj->b", d, precision, d)


def _nearest_sq(queries: np.ndarray, refs: np.ndarray, k: int) -> np.ndarray:
    """(B,) the k-th smallest squared Euclidean distance from each query to ``refs``, in blocks."""
    out = np.empty(len(queries))
    ref_sq = (refs * refs).sum(1)
    for s in range(0, len(queries), 256):
        q = queries[s:s + 256]
        d = (q * q).sum(1)[:, None] + ref_sq[None] - 2 * q @ refs.T
        out[s:s + 256] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return np.maximum(out, 0.0)


def candidate_values(ref: Reference, images: np.ndarray, embeddings: np.ndarray,
                     fine_scores: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Every candidate's value for a batch (larger = more unusual), keyed by CANDIDATES."""
    z = np.asarray(embeddings, np.float64)
    finite = np.isfinite(ref.means).all(1)
    maha = np.stack([_quadratic(z, m, ref.precision) for m in ref.means[finite]], 1).min(1)
    f = np.asarray(fine_scores, np.float64) / n
    f = np.where(np.isfinite(f), f, -np.inf)
    top = f.max(1, keepdims=True)
    energy = -(top[:, 0] + np.log(np.exp(f - top).sum(1)))
    return {"mahalanobis": maha,
            "relative mahalanobis": maha - _quadratic(z, ref.mean_all, ref.precision_all),
            "energy": energy,
            "knn embedding": np.sqrt(_nearest_sq(_unit(z), ref.unit, KNN_K)),
            "knn pixels": np.sqrt(_nearest_sq(rescaled(images), ref.pixels, 1))}


__all__ = ["CANDIDATES", "REFERENCE_SIZE", "Reference", "rescaled", "fit_reference", "candidate_values"]
