"""The train commands' flags as a :class:`~dundi.training.config.TrainConfig`: shared by their
handler and by `dundi submit`, which names a training's default run directory before the job
is sent. Imports no torch."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from dundi.data.specs import DATASETS
from dundi.errors import DundiError
from dundi.training.config import TrainConfig


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    if getattr(args, "holdout_random", None):
        cfg.holdout_classes = holdout_by_seed(cfg.dataset, args.holdout_random, cfg.seed)
    if getattr(args, "paper_loop", False):
        cfg.dedupe = False
    if cfg.certified and getattr(args, "metric", None) is None:
        cfg.metric = "sqeuclidean"
    cfg.validate()
    return cfg


def holdout_by_seed(dataset: str, count: int, seed: int) -> tuple[int, ...]:
    """``count`` dataset classes drawn with ``seed``: the same classes on every machine."""
    num_classes = DATASETS[dataset].num_classes
    if count > num_classes - 2:
        raise DundiError(f"--holdout-random {count} leaves fewer than two of {dataset}'s "
                         f"{num_classes} classes to train on: hold out at most {num_classes - 2}")
    return tuple(sorted(int(c) for c in np.random.default_rng(seed).choice(num_classes, count, replace=False)))


def default_out(cfg: TrainConfig, kind: str) -> Path:
    return Path("runs") / f"{cfg.dataset}-{cfg.arch}-{kind}"
