"""Downloads from the datasets' standard URLs, failing fast when the machine is offline.

Each file has the MD5 that its publishers (and torchvision) list, so a partial or altered
download is caught before it is parsed. Offline detection: the host name is resolved in a
helper thread with a deadline (``urllib``'s timeout does not cover DNS), then the request
itself uses the same short socket timeout. The first failure stops the download: the
remaining files would fail the same way and the next source should be tried at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from dundi.data.errors import SourceFailed

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
_CHUNK = 1 << 20

# dataset -> (mirror base URLs tried in order, {file name: md5})
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
URLS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "mnist": (MNIST_MIRRORS, {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }),
    "fashion-mnist": (("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",), {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }),
    "cifar10": (("https://www.cs.toronto.edu/~kriz/",), {
        # the binary release: fixed-length records, read without unpickling (data/formats.py)
        "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
    }),
}

# MD5 of known train-images files -> dataset, to catch one dataset's files offered as another's
# (MNIST and Fashion-MNIST use identical file names). Includes Debian's recompressed copy.
KNOWN_TRAIN_IMAGES: dict[str, str] = {
    URLS["mnist"][1]["train-images-idx3-ubyte.gz"]: "mnist",
    URLS["fashion-mnist"][1]["train-images-idx3-ubyte.gz"]: "fashion-mnist",
    "cf8536b0aa1a6ac5fa3f23001093305c": "fashion-mnist",  # Debian dataset-fashion-mnist
}


def identify_train_images(path: Path) -> str | None:
    """The dataset a gzipped train-images file is known to belong to, else None."""
    if not path.name.endswith(".gz") or path.stat().st_size > 64 << 20:
        return None
    return KNOWN_TRAIN_IMAGES.get(_md5(path))


def _resolves(host: str, timeout: float) -> str | None:
    """Resolve ``host`` within ``timeout``; return an error text, or None when it resolves."""
    result: list[str | None] = []

    def work() -> None:
        try:
            socket.getaddrinfo(host, None)
            result.append(None)
        except OSError as exc:
            result.append(f"cannot resolve {host} ({exc}); offline?")

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"resolving {host} took over {timeout:.0f}s; offline?"


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # the publishers' checksums are MD5: integrity, not security
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str | None, timeout: float) -> None:
    """Download ``url`` to ``dest`` atomically, verifying ``md5``; raise SourceFailed."""
    host = urllib.parse.urlsplit(url).hostname or ""
    problem = _resolves(host, timeout)
    if problem:
        raise SourceFailed(problem)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            for block in iter(lambda: resp.read(_CHUNK), b""):
                out.write(block)
        if md5 is not None and (got := _md5(tmp)) != md5:
            raise SourceFailed(f"{url}: md5 {got} != expected {md5} (corrupt download)")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
        raise SourceFailed(f"{url}: {getattr(exc, 'reason', exc)}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def download_dataset(dataset: str, dest: Path, timeout: float = DEFAULT_TIMEOUT,
                     progress: Callable[[str], None] = log.info) -> list[str]:
    """Download every file of ``dataset`` into ``dest``; return the URLs used."""
    mirrors, files = URLS[dataset]
    used = []
    for name, md5 in files.items():
        errors = []
        for base in mirrors:
            progress(f"downloading {base}{name}")
            try:
                download_file(base + name, dest / name, md5, timeout)
                used.append(base + name)
                break
            except SourceFailed as exc:
                errors.append(str(exc))
        else:
            raise SourceFailed("; ".join(errors))
    return used
