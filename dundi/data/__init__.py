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

from dundi.data.cache import cache_info, fetch, load_split, resolve_data_dir, shard_paths
from dundi.data.errors import DataFormatError, DatasetUnavailable
from dundi.data.shards import read_shards
from dundi.data.sources import SourceOptions
from dundi.data.specs import DATASETS, SPLIT_ID_OFFSET, SPLITS, DatasetSpec

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
