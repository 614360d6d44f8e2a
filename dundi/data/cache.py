"""The Parquet cache: materialise a dataset once, then load splits or hand shard paths out.

Layout: ``<data_dir>/<dataset>/<split>-<k>.parquet`` plus ``_SUCCESS.json``, written last
(after every shard is in place), so a directory with a valid marker is always complete.
The marker records the source, counts per split, and each shard's size and SHA-256.
``fetch`` holds an exclusive ``flock`` on ``<dataset>/.lock`` while building, so parallel
processes (pytest workers, Ray tasks on one node) build a dataset once.

Ids: ``SPLIT_ID_OFFSET[split] + index`` (train 0..N-1, test 1_000_000+...), unique per
dataset and stable for given source files; see ``specs.SPLIT_ID_OFFSET``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import platformdirs

from dundi.data.errors import DataFormatError
from dundi.data.shards import read_shards, write_split
from dundi.data.sources import SourceOptions, load_raw
from dundi.data.specs import SPLIT_ID_OFFSET, SPLITS, check_split, get_spec
from dundi.files import sha256_file

log = logging.getLogger(__name__)

MARKER = "_SUCCESS.json"
FORMAT_VERSION = 2  # 2: mnist-10k splits stored in a seeded shuffled order
Progress = Callable[[str], None]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: the argument, else ``$DUNDI_DATA_DIR``, else the user cache dir."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("DUNDI_DATA_DIR"):
        return Path(os.environ["DUNDI_DATA_DIR"]).expanduser()
    return Path(platformdirs.user_cache_dir("dundi")) / "data"


def dataset_dir(dataset: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Where ``dataset``'s shards live."""
    get_spec(dataset)
    return resolve_data_dir(data_dir) / dataset


def read_marker(directory: Path, verify: bool = False) -> dict | None:
    """The marker if present and consistent with the shards on disk, else None.

    Cheap by default (shards exist with the recorded sizes); ``verify`` re-hashes them.
    """
    try:
        marker = json.loads((directory / MARKER).read_text())
        if marker.get("format") != FORMAT_VERSION or marker.get("dataset") != directory.name:
            return None
        for split in SPLITS:
            for shard in marker["shards"][split]:
                path = directory / shard["file"]
                if path.stat().st_size != shard["bytes"]:
                    return None
                if verify and sha256_file(path) != shard["sha256"]:
                    return None
        return marker
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clear(directory: Path) -> None:
    """Remove a stale marker first, then old shards and leftovers of crashed runs.

    Called under the lock, so no other process is writing here.
    """
    (directory / MARKER).unlink(missing_ok=True)
    for old in [*directory.glob("*.parquet"), *directory.glob(".*.tmp-*")]:
        old.unlink()
    for scratch in directory.glob(".scratch-*"):
        shutil.rmtree(scratch, ignore_errors=True)


def _build(dataset: str, directory: Path, source_dir: Path | None,
           options: SourceOptions | None, progress: Progress) -> dict:
    start = time.monotonic()
    scratch = directory / f".scratch-{os.getpid()}"
    try:
        raw = load_raw(dataset, source_dir, scratch, options, progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _clear(directory)
    shards, counts = {}, {}
    for split in SPLITS:
        images, labels = raw.splits[split]
        ids = SPLIT_ID_OFFSET[split] + np.arange(len(images), dtype=np.int64)
        progress(f"{dataset}: writing {len(images)} {split} rows")
        shards[split] = write_split(directory, dataset, split, images, labels, ids)
        counts[split] = int(len(images))
    spec = get_spec(dataset)
    return {
        "format": FORMAT_VERSION, "dataset": dataset, "source": raw.source,
        "counts": counts, "shards": shards, "shape": list(spec.shape),
        "num_classes": spec.num_classes, "id_offsets": SPLIT_ID_OFFSET,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fetch_seconds": round(time.monotonic() - start, 3),
    }


def fetch(dataset: str, data_dir: str | os.PathLike | None = None,
          source_dir: str | os.PathLike | None = None, *,
          options: SourceOptions | None = None, progress: Progress | None = None,
          verify: bool = False) -> Path:
    """Materialise ``dataset`` as Parquet shards and return its directory; idempotent.

    Returns at once when a valid marker exists. Otherwise tries the sources in order
    (``sources.py``) and raises ``DatasetUnavailable`` listing all of them if none works.
    """
    directory = dataset_dir(dataset, data_dir)
    if read_marker(directory, verify) is not None:
        return directory
    progress = progress or log.info
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        if read_marker(directory, verify) is not None:  # built by another process meanwhile
            return directory
        marker = _build(dataset, directory, Path(source_dir) if source_dir else None,
                        options, progress)
        _write_json_atomic(directory / MARKER, marker)
    progress(f"{dataset}: cached {marker['counts']} in {directory}")
    return directory


def shard_paths(dataset: str, split: str, data_dir: str | os.PathLike | None = None
                ) -> list[Path]:
    """The shard files of one split, in id order (fetching first if needed)."""
    check_split(split)
    directory = fetch(dataset, data_dir)
    marker = read_marker(directory)
    if marker is None:
        raise DataFormatError(f"{directory}: cache changed while reading; run fetch again")
    return [directory / shard["file"] for shard in marker["shards"][split]]


def load_split(dataset: str, split: str, data_dir: str | os.PathLike | None = None,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images float32 NCHW in [0,1], labels int64, ids int64) of a split; first ``limit`` rows."""
    return read_shards(shard_paths(dataset, split, data_dir), limit=limit)


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.parquet"))


def cache_info(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """What is cached: one dict per dataset directory (complete or not), sorted by name."""
    root = resolve_data_dir(data_dir)
    if not root.is_dir():
        return []
    info = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        marker = read_marker(directory)
        if marker is None and not any(directory.glob("*.parquet")):
            continue
        counts = marker["counts"] if marker else {}
        info.append({
            "dataset": directory.name, "path": str(directory), "complete": marker is not None,
            "splits": [s for s in SPLITS if s in counts], "counts": counts, "bytes": _dir_bytes(directory),
            "source": marker["source"] if marker else None,
            "created": marker["created"] if marker else None,
        })
    return info
