"""Calibrating the abstain threshold on held-out data.

An input far from every oracle is one the oracle database says nothing about (another
dataset, noise, a heavily perturbed image): the service can answer "unknown" instead of the
nearest class. The threshold is the ``quantile`` of the nearest-oracle distance over
held-out, in-distribution images, so about ``1 − quantile`` of clean inputs abstain.

Held-out data: the validation part of the run's training split (the same seeded split the
training used, so the model never trained on it), minus any image that is itself an oracle.
A run trained without a validation part falls back to the test split, and says so.
"""

from __future__ import annotations

import numpy as np

from dundi.errors import DundiError
from dundi.serving.model import LoadedModel


def held_out_images(model: LoadedModel, data_dir: str | None = None, limit: int | None = 2000
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, description) of in-distribution images the model did not train on."""
    from dundi.data import load_split
    from dundi.train import split_train_val

    meta = model.run.meta
    cfg = meta.get("config", {})
    images, labels, ids = load_split(meta["dataset"], "train", data_dir, limit=cfg.get("limit"))
    _, va = split_train_val(labels, cfg.get("val_fraction", 0.0), cfg.get("seed", 0))
    oracle_ids = set(model.run.oracle.meta.get("ids", [])) if model.run.oracle else set()
    va = np.array([i for i in va if int(ids[i]) not in oracle_ids], dtype=np.int64)
    if len(va):
        source = f"{meta['dataset']} train split, validation part held out by training ({len(va)} images)"
    else:
        images, labels, _ = load_split(meta["dataset"], "test", data_dir)
        va = np.arange(len(labels))
        source = (f"{meta['dataset']} test split (the run holds no validation part out of training; "
                  f"do not report test accuracy with this threshold as untouched)")
    if limit is not None and len(va) > limit:
        va = np.sort(np.random.default_rng(0).choice(va, limit, replace=False))
    return images[va], labels[va], source


def calibrate(model: LoadedModel, images: np.ndarray, labels: np.ndarray | None = None,
              quantile: float = 0.99) -> dict:
    """Threshold = ``quantile`` of the nearest-oracle distances of ``images`` under the
    model's n, m, k (without abstaining). Returns the threshold with the figures behind it."""
    if not 0.0 < quantile <= 1.0:
        raise DundiError(f"the abstain quantile must be in (0, 1], got {quantile}")
    if len(images) == 0:
        raise DundiError("no held-out images to calibrate the abstain threshold on")
    r = model.run.classify(images, n=model.n, m=model.config.m, k=model.config.k)
    dist = r.nearest_distance
    threshold = float(np.quantile(dist, quantile))
    kept = dist <= threshold
    out = {"abstain_threshold": threshold, "quantile": quantile, "count": int(len(dist)),
           "abstain_rate": float(1.0 - kept.mean()),
           "distance_median": float(np.median(dist)), "distance_max": float(dist.max())}
    if labels is not None:
        correct = r.labels == labels
        out["accuracy"] = float(correct.mean())
        out["accuracy_when_answering"] = float(correct[kept].mean()) if kept.any() else float("nan")
    return out
