"""Datasets for DunDi: standard-format readers, offline sources and the Parquet cache.

Public API (see docs/ARCHITECTURE.md, "Data API")::

    spec = DATASETS["mnist-10k"]                 # name, num_classes, shape (C,H,W), class_names
    fetch("mnist-10k", data_dir=None, source_dir=None) -> Path
    load_split("mnist-10k", "train", data_dir=None, limit=None) -> (images, labels, ids)
    shard_paths("mnist-10k", "train", data_dir=None) -> list[Path]
    read_shards(paths) -> (images, labels, ids)
    cache_info(data_dir=None) -> list[dict]

Images are float32 numpy arrays (N, C, H, W) in [0, 1]; labels and ids are int64.
This package never imports ray.
"""

from __future__ import annotations

import importlib
from typing import Any

from dundi.data.errors import DataFormatError, DatasetUnavailable
from dundi.data.specs import DATASETS, SPLIT_ID_OFFSET, SPLITS, DatasetSpec

# The cache, the shard reader and the sources import numpy and pyarrow: they load on first use,
# so what a dataset *is* (dundi.data.specs) costs nothing to import (`dundi --help` lists them).
_LAZY = {"cache_info": "cache", "fetch": "cache", "load_split": "cache", "resolve_data_dir": "cache",
         "shard_paths": "cache", "read_shards": "shards", "SourceOptions": "sources"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # looked up once
    return value


__all__ = [
    "DATASETS",
    "SPLITS",
    "SPLIT_ID_OFFSET",
    "DatasetSpec",
    "DataFormatError",
    "DatasetUnavailable",
    "SourceOptions",
    "cache_info",
    "fetch",
    "load_split",
    "read_shards",
    "resolve_data_dir",
    "shard_paths",
]
