"""Parquet shards: the cache's on-disk format, written atomically and read without copies.

One row per image: ``id`` int64, ``split`` string, ``label`` int64, ``image`` binary
(uint8 pixels, C*H*W bytes, row-major CHW). The image shape and dataset name are stored
in the Parquet schema metadata so ``read_shards`` needs nothing but the paths (Ray
workers get only paths). Shards hold ~10k rows so workers can split work by file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dundi.data.errors import DataFormatError
from dundi.files import sha256_file

SHARD_ROWS = 10_000
SCHEMA = pa.schema([("id", pa.int64()), ("split", pa.string()),
                    ("label", pa.int64()), ("image", pa.binary())])
_META_SHAPE = b"dundi.shape"
_META_DATASET = b"dundi.dataset"


def _image_column(images: np.ndarray) -> pa.BinaryArray:
    """Build the binary column straight from the pixel buffer (no per-row Python bytes)."""
    n, size = len(images), int(np.prod(images.shape[1:]))
    offsets = np.arange(0, (n + 1) * size, size, dtype=np.int32)
    data = np.ascontiguousarray(images, dtype=np.uint8).reshape(-1)
    return pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets),
                                                        pa.py_buffer(data)])


def _table(split: str, images: np.ndarray, labels: np.ndarray, ids: np.ndarray,
           dataset: str) -> pa.Table:
    shape = ",".join(str(d) for d in images.shape[1:])
    schema = SCHEMA.with_metadata({_META_SHAPE: shape.encode(), _META_DATASET: dataset.encode()})
    columns = [pa.array(ids, pa.int64()), pa.array([split] * len(ids), pa.string()),
               pa.array(labels, pa.int64()), _image_column(images)]
    return pa.Table.from_arrays(columns, schema=schema)


def write_shard(path: Path, table: pa.Table) -> dict:
    """Write one shard atomically (temp file, then ``os.replace``); return its record."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        record = {"file": path.name, "rows": table.num_rows,
                  "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return record


def write_split(directory: Path, dataset: str, split: str, images: np.ndarray,
                labels: np.ndarray, ids: np.ndarray, rows: int | None = None) -> list[dict]:
    """Write ``<split>-<k>.parquet`` shards of at most ``rows`` (default SHARD_ROWS) rows."""
    rows = rows or SHARD_ROWS
    records = []
    for k, start in enumerate(range(0, len(images), rows)):
        part = slice(start, start + rows)
        table = _table(split, images[part], labels[part], ids[part], dataset)
        records.append(write_shard(directory / f"{split}-{k}.parquet", table))
    return records


def _shape_of(table: pa.Table, path: Path) -> tuple[int, ...]:
    meta = table.schema.metadata or {}
    if _META_SHAPE not in meta:
        raise DataFormatError(f"{path}: not a DunDi shard (no {_META_SHAPE.decode()} metadata)")
    return tuple(int(d) for d in meta[_META_SHAPE].decode().split(","))


def _pixels(column: pa.ChunkedArray, size: int, path: Path) -> np.ndarray:
    """Concatenate the image bytes of a binary column, checking every value's length."""
    parts = []
    for chunk in column.chunks:
        if chunk.null_count:
            raise DataFormatError(f"{path}: null images")
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
        if len(chunk) and np.any(np.diff(offsets) != size):
            raise DataFormatError(f"{path}: an image is not {size} bytes")
        parts.append(np.frombuffer(data_buf, np.uint8)[offsets[0]:offsets[-1]] if len(chunk)
                     else np.empty(0, np.uint8))
    return np.concatenate(parts) if parts else np.empty(0, np.uint8)


def read_shards_uint8(paths: Iterable[str | Path], limit: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read shards in order as (uint8 NCHW images, int64 labels, int64 ids), up to ``limit``."""
    images, labels, ids = [], [], []
    shape: tuple[int, ...] | None = None
    remaining = limit
    for path in map(Path, paths):
        if remaining is not None and remaining <= 0 and shape is not None:
            break
        table = pq.read_table(path)
        if remaining is not None:
            table = table.slice(0, remaining)
            remaining -= table.num_rows
        this_shape = _shape_of(table, path)
        if shape is not None and this_shape != shape:
            raise DataFormatError(f"{path}: image shape {this_shape} differs from {shape}")
        shape = this_shape
        size = int(np.prod(shape))
        images.append(_pixels(table.column("image"), size, path).reshape(-1, *shape))
        labels.append(table.column("label").to_numpy().astype(np.int64, copy=False))
        ids.append(table.column("id").to_numpy().astype(np.int64, copy=False))
    if shape is None:
        raise DataFormatError("read_shards: no shard paths given")
    return np.concatenate(images), np.concatenate(labels), np.concatenate(ids)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (the project-wide image convention)."""
    return np.divide(images, np.float32(255.0), dtype=np.float32)


def read_shards(paths: Sequence[str | Path], limit: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read shards as (float32 NCHW images in [0,1], int64 labels, int64 ids)."""
    images, labels, ids = read_shards_uint8(paths, limit)
    return to_float(images), labels, ids
