"""Readers (and small writers) for the datasets' standard distribution formats.

* IDX (MNIST, Fashion-MNIST): ``train-images-idx3-ubyte[.gz]`` etc. Readers check the magic
  number, the element type, the dimensions and the exact payload length, so a truncated or
  corrupt download fails with a message naming the file instead of a reshape error later.
* CIFAR-10, either official release, in a directory, its standard sub-directory, or the
  ``.tar.gz``: the binary release (``cifar-10-batches-bin/data_batch_1..5.bin``,
  ``test_batch.bin``: fixed-length byte records, nothing to unpickle; the default download)
  or the python release (``cifar-10-batches-py``: pickles, read with ``safe_pickle``, never
  ``pickle.load``). Members of a tar are read in memory, never extracted, so archive paths
  cannot escape.

Readers return ``uint8`` images shaped ``(N, C, H, W)`` and ``int64`` labels. The writers
exist so tests (and users converting data) can produce files in exactly these formats.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dundi.data.errors import DataFormatError
from dundi.data.safe_pickle import safe_loads, to_array

Arrays = tuple[np.ndarray, np.ndarray]  # (images uint8 NCHW, labels int64)

# ---------------------------------------------------------------------------- IDX

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[str, int] = {dt.str.lstrip("<>|="): code for code, dt in _IDX_DTYPES.items()}

IDX_NAMES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    """Read a file, gunzipping it when it starts with the gzip magic (whatever its name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataFormatError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes: 2 zero bytes, type code, ndim, big-endian uint32 dims, payload."""
    if len(data) < 4:
        raise DataFormatError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataFormatError(
            f"{name}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTNN with a "
            "known type TT and 1-4 dimensions); not an IDX file?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{name}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DataFormatError(
            f"{name}: IDX file {what}: dims {dims} need {expected} payload bytes, found {found}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file, raw or gzipped."""
    path = Path(path)
    return parse_idx(_read_maybe_gzip(path), str(path))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an IDX file (gzipped when the name ends in ``.gz``); used to make test files."""
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.str.lstrip("<>|="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    big_endian = array.astype(_IDX_DTYPES[code], copy=False)
    data = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    data += np.ascontiguousarray(big_endian).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """Find ``stem`` raw or ``.gz``, also the common ``train-images.idx3-ubyte`` spelling."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def missing_idx_files(directory: Path) -> list[str]:
    """Names of the four IDX files not present in ``directory`` (empty = all there)."""
    stems = [stem for pair in IDX_NAMES.values() for stem in pair]
    return [s + "[.gz]" for s in stems if find_idx_file(directory, s) is None]


def read_idx_split(images_path: Path, labels_path: Path) -> Arrays:
    """Read an images/labels pair, checking they agree; images come back as (N, 1, H, W)."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(f"{images_path}: expected uint8 images (N, H, W), got "
                              f"{images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise DataFormatError(f"{labels_path}: expected 1-D labels, got shape {labels.shape}")
    if len(labels) != len(images):
        raise DataFormatError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    return images[:, None, :, :], labels.astype(np.int64)


def read_idx_dataset(directory: str | Path) -> dict[str, Arrays]:
    """Read train and test from a directory holding the four standard IDX files."""
    directory = Path(directory)
    missing = missing_idx_files(directory)
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}")
    out: dict[str, Arrays] = {}
    for split, (img_stem, lbl_stem) in IDX_NAMES.items():
        img, lbl = find_idx_file(directory, img_stem), find_idx_file(directory, lbl_stem)
        assert img is not None and lbl is not None
        out[split] = read_idx_split(img, lbl)
    return out


# ------------------------------------------------------------------------ CIFAR-10

_CIFAR_SHAPE = (3, 32, 32)
_CIFAR_RECORD = 1 + int(np.prod(_CIFAR_SHAPE))  # binary release: a label byte, then CHW pixels


def parse_cifar_binary(data: bytes, name: str = "<bytes>") -> Arrays:
    """Decode one file of the binary release (``data_batch_1.bin`` ...): fixed 3,073-byte
    records, a label byte then 1,024 red, 1,024 green and 1,024 blue bytes. Plain bytes: nothing
    is unpickled, and a truncated file is caught by its length."""
    if not data or len(data) % _CIFAR_RECORD:
        raise DataFormatError(f"{name}: {len(data)} bytes is not a whole number of {_CIFAR_RECORD}-byte "
                              f"CIFAR-10 records (truncated or not a CIFAR-10 .bin file)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataFormatError(f"{name}: label byte {int(labels.max())} is outside 0..9")
    return records[:, 1:].reshape(-1, *_CIFAR_SHAPE).copy(), labels


def write_cifar_binary(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a binary-release CIFAR-10 file; for tests and conversions."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.shape[1:] != _CIFAR_SHAPE:
        raise ValueError(f"CIFAR images must be (N, 3, 32, 32), got {images.shape}")
    records = np.concatenate([np.asarray(labels, np.uint8)[:, None], images.reshape(len(images), -1)], 1)
    Path(path).write_bytes(records.tobytes())


def parse_cifar_batch(data: bytes, name: str = "<bytes>") -> Arrays:
    """Decode one CIFAR python batch (a pickled dict) with the restricted unpickler.

    Kept beside the binary reader for one reason: the python release is the one most users
    already have (torchvision downloads it), and re-fetching 162 MB to avoid it would be
    worse than reading it through :mod:`dundi.data.safe_pickle`, which rebuilds only the
    dict, lists, ints, bytes and one uint8 array a batch holds. Fresh downloads take the
    binary release."""
    try:
        batch = safe_loads(data)
    except Exception as exc:  # any failure to decode untrusted bytes means "corrupt file"
        raise DataFormatError(f"{name}: not a valid CIFAR batch pickle ({exc})") from exc
    if not isinstance(batch, dict):
        raise DataFormatError(f"{name}: CIFAR batch is a {type(batch).__name__}, not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataFormatError(f"{name}: CIFAR batch lacks 'data' or 'labels' "
                              f"(keys: {sorted(map(str, batch))})")
    try:
        flat = to_array(batch["data"])
    except ValueError as exc:
        raise DataFormatError(f"{name}: bad 'data' array ({exc})") from exc
    labels = batch["labels"]
    if not isinstance(labels, list) or not all(isinstance(v, int) for v in labels):
        raise DataFormatError(f"{name}: 'labels' is not a list of ints")
    if flat.ndim != 2 or flat.shape[1] != int(np.prod(_CIFAR_SHAPE)) or len(flat) != len(labels):
        raise DataFormatError(f"{name}: data shape {flat.shape} does not match "
                              f"{len(labels)} labels of 3x32x32 images")
    # Rows are 1024 red, then 1024 green, then 1024 blue bytes: already CHW.
    return flat.reshape(-1, *_CIFAR_SHAPE), np.asarray(labels, dtype=np.int64)


def write_cifar_batch(path: str | Path, images: np.ndarray, labels: np.ndarray,
                      batch_label: str = "batch") -> None:
    """Write a CIFAR-format batch (``pickle.dump`` is fine for writing); for tests."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.shape[1:] != _CIFAR_SHAPE:
        raise ValueError(f"CIFAR images must be (N, 3, 32, 32), got {images.shape}")
    batch = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=4)


@dataclass(frozen=True)
class CifarRelease:
    """One of the two official CIFAR-10 releases: where its files live and how to read one."""

    directory: str
    archive: str
    splits: dict[str, tuple[str, ...]]
    parse: Callable[[bytes, str], Arrays]

    def members(self) -> set[str]:
        return {n for names in self.splits.values() for n in names}


CIFAR10_BINARY = CifarRelease("cifar-10-batches-bin", "cifar-10-binary.tar.gz",
                              {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                               "test": ("test_batch.bin",)}, parse_cifar_binary)
CIFAR10_PYTHON = CifarRelease("cifar-10-batches-py", "cifar-10-python.tar.gz",
                              {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                               "test": ("test_batch",)}, parse_cifar_batch)
CIFAR10_RELEASES = (CIFAR10_BINARY, CIFAR10_PYTHON)  # the binary release first: no unpickling


def _concat(parts: list[Arrays]) -> Arrays:
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _batches_dir(path: Path, release: CifarRelease) -> Path | None:
    """The directory that actually holds a release's files: ``path`` or its standard sub-dir."""
    first = (release.splits["test"][0], release.splits["train"][0])
    for candidate in (path, path / release.directory):
        if any((candidate / n).is_file() for n in first):
            return candidate
    return None


def _read_cifar_dir(directory: Path, release: CifarRelease) -> dict[str, Arrays]:
    missing = sorted(n for n in release.members() if not (directory / n).is_file())
    if missing:
        raise FileNotFoundError(f"{directory}: missing CIFAR-10 files {', '.join(missing)}")
    return {split: _concat([release.parse((directory / n).read_bytes(), str(directory / n)) for n in names])
            for split, names in release.splits.items()}


def _read_cifar_tar(path: Path, release: CifarRelease) -> dict[str, Arrays]:
    """Members are read in memory, never extracted, so archive paths cannot escape."""
    wanted, found = release.members(), {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in found:
                    fh = tar.extractfile(member)
                    assert fh is not None
                    found[base] = release.parse(fh.read(), f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataFormatError(f"{path}: corrupt or truncated tar archive ({exc})") from exc
    missing = sorted(wanted - found.keys())
    if missing:
        raise DataFormatError(f"{path}: archive lacks CIFAR-10 files {', '.join(missing)}")
    return {split: _concat([found[n] for n in names]) for split, names in release.splits.items()}


def read_cifar10(path: str | Path) -> dict[str, Arrays]:
    """Read CIFAR-10 from either official release -- the binary one (``*.bin`` records, read
    as bytes) or the python one (pickled batches, restricted unpickler) -- given its files'
    directory, its parent, or its ``.tar.gz`` archive. The binary release wins where both are."""
    path = Path(path)
    if path.is_file():
        release = CIFAR10_BINARY if path.name == CIFAR10_BINARY.archive else CIFAR10_PYTHON
        return _read_cifar_tar(path, release)
    for release in CIFAR10_RELEASES:
        directory = _batches_dir(path, release)
        if directory is not None:
            return _read_cifar_dir(directory, release)
    for release in CIFAR10_RELEASES:
        if (path / release.archive).is_file():
            return _read_cifar_tar(path / release.archive, release)
    raise FileNotFoundError(
        f"{path}: no CIFAR-10 here: expected the binary release (cifar-10-binary.tar.gz or "
        f"cifar-10-batches-bin/ with data_batch_1..5.bin, test_batch.bin) or the python release "
        f"(cifar-10-python.tar.gz or cifar-10-batches-py/)")
