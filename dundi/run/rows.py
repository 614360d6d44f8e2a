"""A split's rows as a run answers them: only the classes it holds, renumbered as its index
numbers them. Below the pipeline, so that the pipeline and what it calls (dundi.run.shape_fit)
share one definition without importing each other."""

from __future__ import annotations

import numpy as np

from dundi.run.storage import dataset_classes_of


def drop_holdout(images: np.ndarray, labels: np.ndarray, ids: np.ndarray, kept: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of the kept classes, labels renumbered 0..len(kept)-1 in ``kept``'s order.

    Why renumber: every training path (tuples, certified batches, validation index) assumes
    labels 0..C-1; a run trained on C' < C classes is a C'-class run whose index names the
    dataset classes it holds (``dataset_classes`` in the run's metadata). A negative entry
    (a class enrolled from images outside the dataset) matches no row."""
    valid = kept >= 0
    rows = np.isin(labels, kept[valid])
    remap = np.full(int(max(labels.max(initial=0), kept.max(initial=0))) + 1, -1, dtype=np.int64)
    remap[kept[valid]] = np.flatnonzero(valid)
    return images[rows], remap[labels[rows]], ids[rows]


def run_rows(meta: dict, images: np.ndarray, labels: np.ndarray, ids: np.ndarray,
             trained: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A split's rows as the run answers them: only the dataset classes its live oracle index
    holds (trained or enrolled), numbered as the index numbers them; with ``trained``, the
    classes the run was trained on (those `index build` picks oracles for)."""
    classes = meta.get("dataset_classes") if trained else dataset_classes_of(meta)
    if classes is None:
        return images, labels, ids
    return drop_holdout(images, labels, ids, np.asarray(classes, dtype=np.int64))
