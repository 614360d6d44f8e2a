"""Random training tuples (paper §4.1): anchor and positive of one class, negative of another."""

from __future__ import annotations

import numpy as np


def sample_tuples(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` tuples of indices into ``labels`` as an int64 array of shape (count, 3).

    The anchor class is drawn uniformly, anchor and positive are two distinct samples of it,
    the negative is a sample of a uniformly drawn other class. Deterministic in ``seed``.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("tuples need at least two classes in the training data")
    members = [np.flatnonzero(labels == c) for c in classes]
    sizes = np.array([len(m) for m in members])
    if (sizes < 2).any():
        raise ValueError("every class needs at least two samples to form a positive pair")
    rng = np.random.default_rng(seed)
    ca = rng.integers(len(classes), size=count)
    # other class: shift by 1..C-1 so it is uniform over the classes != ca
    cn = (ca + rng.integers(1, len(classes), size=count)) % len(classes)
    ia = rng.integers(sizes[ca])
    ip = rng.integers(sizes[ca] - 1)
    ip = ip + (ip >= ia)  # distinct from the anchor
    ineg = rng.integers(sizes[cn])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(members)
    return np.stack([flat[offsets[ca] + ia], flat[offsets[ca] + ip], flat[offsets[cn] + ineg]], 1
                    ).astype(np.int64)
