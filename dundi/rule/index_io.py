"""An oracle index on disk, as free functions over plain arrays (as FAISS's contrib keeps such
things): the oracles in FAISS's own flat format, class-major, and a JSON file with the class
names, per-class counts and the index's metadata. Both are written atomically; nothing is
unpickled on reading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np

from dundi.errors import DundiError

INDEX_FILE = "index.faiss"
META_FILE = "oracle.json"
FORMAT = 2  # 1: equal class blocks, no names; 2: per-class counts and names
# metadata write_oracles derives from the arrays themselves: dropped on reading so it cannot go stale
DERIVED = ("class_names", "counts", "format", "layout", "num_classes", "n", "dim")


def write_oracles(directory: str | os.PathLike, vectors: np.ndarray, counts: np.ndarray,
                  class_names: list[str], meta: dict, index_file: str = INDEX_FILE,
                  meta_file: str = META_FILE) -> dict[str, str]:
    """Write oracles (N, D), class-major with ``counts`` rows per class, and their metadata,
    each atomically (temp file + os.replace); returns the file names. Other file names let a
    caller keep several versions side by side."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = faiss.IndexFlatL2(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    tmp = directory / (index_file + ".tmp")
    faiss.write_index(flat, str(tmp))
    os.replace(tmp, directory / index_file)
    full = {**meta, "format": FORMAT, "num_classes": len(counts), "n": int(np.max(counts)),
            "dim": int(vectors.shape[1]), "class_names": list(class_names), "counts": [int(c) for c in counts],
            "layout": "class-major: class c holds the next counts[c] rows, in order"}
    tmp = directory / (meta_file + ".tmp")
    tmp.write_text(json.dumps(full, indent=2))
    os.replace(tmp, directory / meta_file)
    return {"index": index_file, "meta": meta_file}


def read_oracles(directory: str | os.PathLike, index_file: str = INDEX_FILE, meta_file: str = META_FILE
                 ) -> tuple[np.ndarray, list[int], list[str] | None, dict]:
    """(vectors, counts, class names or None, metadata) written by :func:`write_oracles`.
    Indexes written before names and counts were stored read as equal blocks without names."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / meta_file).read_text())
        flat = faiss.read_index(str(directory / index_file))
    except (OSError, RuntimeError, ValueError) as exc:
        raise DundiError(f"cannot read the oracle index in {directory}: {exc}. "
                         f"Build it with `dundi index build RUN`.") from exc
    counts = meta.get("counts") or [meta["n"]] * meta["num_classes"]
    if flat.ntotal != sum(counts) or flat.d != meta["dim"] or len(counts) != meta["num_classes"]:
        raise DundiError(f"oracle index in {directory} does not match its metadata")
    vectors = flat.reconstruct_n(0, flat.ntotal)
    names = meta.get("class_names")
    return vectors, counts, names, {k: v for k, v in meta.items() if k not in DERIVED}
