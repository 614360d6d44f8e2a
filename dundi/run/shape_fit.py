"""The run's shape basis (:mod:`dundi.rule.shape_signal`) fitted from its own training images:
by `dundi index build` (with the run's first index) and `dundi index calibrate` (for a run built
before the shape signal existed), never by a service, which only reads it."""

from __future__ import annotations

import os

import numpy as np

from dundi.data import load_split
from dundi.rule.shape_signal import SHAPE_FILE, SHAPE_FIT_SIZE, fit_basis
from dundi.run.rows import run_rows
from dundi.run.storage import read_meta, save_shape_basis
from dundi.training.passes import split_train_val


def training_images(meta: dict, size: int, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of ``size`` images of the training part of the run's train split, in a
    seeded order: what references of the abstain rule are fitted on (never the held-out part
    that calibrates it, never the test split). ``meta``: the run's run.json."""
    cfg = meta.get("config", {})
    images, labels, _ = run_rows(meta, *load_split(meta["dataset"], "train", data_dir, limit=cfg.get("limit")))
    train, _ = split_train_val(labels, cfg.get("val_fraction", 0.0), cfg.get("seed", 0))
    pick = np.random.default_rng(0).permutation(train)[:size]
    return images[pick], labels[pick]


def ensure_shape_basis(run_dir: str | os.PathLike, data_dir: str | None = None) -> dict:
    """Fit and store the run's shape basis where run.json records none; returns run.json."""
    meta = read_meta(run_dir)
    if SHAPE_FILE in meta.get("files", {}):
        return meta
    images, _ = training_images(meta, SHAPE_FIT_SIZE, data_dir)
    return save_shape_basis(run_dir, fit_basis(images))
