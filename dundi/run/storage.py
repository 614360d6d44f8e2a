"""Run storage: a run directory's files, its index versions and its write lock.

A run directory holds::

    run.json             kind, dataset, arch, config, seed, metrics, sha256 of every file
    model.safetensors    the model's state dict
    oracle/vN/index.faiss   version N of the oracle embeddings (`dundi index build`, `index add`,
    oracle/vN/oracle.json   `index remove`): class names, counts, seed, sample ids, weights sha256

Every file is written atomically (temporary file, then rename) and its sha256 recorded in
``run.json``; loading re-hashes and refuses a file that changed. Nothing is unpickled.

Oracle index versions: every change of the index writes a whole new version directory next to
the old ones, and only then rewrites ``run.json`` (one ``os.replace``) to name it as the live
version. ``run.json`` is the commit point: a process killed before it leaves the previous
version live and loadable, and the half-written directory is never read (it is not recorded in
``run.json``; the next change overwrites it). Older versions stay on disk with their hashes, so
a service can pin one (``index_version``) while another is written. Runs written before
versions existed keep their index in ``oracle/`` itself: version 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dundi.errors import DundiError
from dundi.files import atomic_write_json, sha256_file
from dundi.nets.models import build_distance_net, build_native
from dundi.rule.index import INDEX_FILE, META_FILE, OracleIndex
from dundi.rule.shape_signal import SHAPE_FILE, ShapeBasis, load_basis, save_basis

RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
ORACLE_DIR = "oracle"


def read_meta(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DundiError(f"{run_dir} is not a DunDi run (no {RUN_FILE}); "
                         f"create one with `dundi train` or `dundi train-native`") from None
    except json.JSONDecodeError as exc:
        raise DundiError(f"{path} is not valid JSON ({exc}); the run is damaged") from None


def _remedy(run_dir: Path, name: str) -> str:
    """What to do about a damaged file: an oracle index can be rebuilt from the weights in
    seconds, the weights only by training again (or restoring a copy)."""
    if name.startswith(ORACLE_DIR + "/"):
        return f"rebuild the index with `dundi index build {run_dir}`"
    return "restore the file from a copy of the run, or train the run again"


def _verify(run_dir: Path, meta: dict, name: str) -> Path:
    path = run_dir / name
    expected = meta.get("files", {}).get(name)
    if expected is None:
        raise DundiError(f"{run_dir}: {name} is not recorded in {RUN_FILE}; {_remedy(run_dir, name)}")
    if not path.exists():
        raise DundiError(f"{run_dir}: {name} is missing; {_remedy(run_dir, name)}")
    if sha256_file(path) != expected:
        raise DundiError(f"{run_dir}: {name} does not match the sha256 recorded in {RUN_FILE}; "
                         f"it was modified, truncated or replaced after the run was written, so it is "
                         f"not loaded: {_remedy(run_dir, name)}")
    return path


def environment() -> dict[str, str]:
    import faiss

    return {"python": platform.python_version(), "torch": torch.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__, "host": platform.node()}


def save_model(run_dir: str | os.PathLike, model: nn.Module, meta: dict) -> dict:
    """Write the model's weights and ``run.json``. ``meta`` must say how to rebuild the model:
    kind ("native" | "dundi"), arch, in_shape, num_classes, and for dundi embed_dim and mode
    ("R" | "P")."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (WEIGHTS_FILE + f".tmp{os.getpid()}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, run_dir / WEIGHTS_FILE)
    meta = {**meta, "files": {WEIGHTS_FILE: sha256_file(run_dir / WEIGHTS_FILE)},
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": environment()}
    atomic_write_json(run_dir / RUN_FILE, meta)
    return meta


def update_meta(run_dir: str | os.PathLike, **fields: Any) -> dict:
    """Merge ``fields`` into run.json (atomically)."""
    meta = read_meta(run_dir)
    meta.update(fields)
    atomic_write_json(Path(run_dir) / RUN_FILE, meta)
    return meta


def build_from_meta(meta: dict) -> nn.Module:
    shape = tuple(meta["in_shape"])
    if meta["kind"] == "native":
        return build_native(meta["arch"], shape, meta["num_classes"], hidden=meta.get("hidden"))
    if meta["kind"] == "dundi":
        pretrained = build_native(meta["arch"], shape, meta["num_classes"]) if meta["mode"] == "P" else None
        return build_distance_net(meta["arch"], shape, meta["embed_dim"], pretrained=pretrained,
                                  prototypes=meta.get("prototypes", 0))
    raise DundiError(f"unknown run kind {meta['kind']!r} in {RUN_FILE}")


def load_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild the model of a run from its metadata and load its verified weights."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    path = _verify(run_dir, meta, WEIGHTS_FILE)
    model = build_from_meta(meta)
    try:
        model.load_state_dict(load_file(str(path)))
    except (RuntimeError, KeyError) as exc:
        raise DundiError(f"{path} does not fit the model described in {RUN_FILE}: {exc}") from None
    model.eval()
    return model, meta


def _version_dir(version: int) -> str:
    """The run-relative directory of an index version (0: the unversioned ``oracle/``)."""
    return ORACLE_DIR if version == 0 else f"{ORACLE_DIR}/v{version}"


def index_versions(meta: dict) -> list[int]:
    """The index versions recorded in ``run.json`` (committed ones only), oldest first."""
    files = meta.get("files", {})
    parts = (k.split("/") for k in files)
    named = {int(p[1][1:]) for p in parts if len(p) == 3 and p[0] == ORACLE_DIR
             and p[1][:1] == "v" and p[1][1:].isdigit()}
    return sorted(v for v in {0, *named} if f"{_version_dir(v)}/{INDEX_FILE}" in files)


def index_version(meta: dict) -> int | None:
    """The live index version (None: the run has no index yet)."""
    versions = index_versions(meta)
    if not versions:
        return None
    return int((meta.get("oracle") or {}).get("version", versions[-1]))


def index_file_key(meta: dict, version: int | None = None) -> str | None:
    """The ``files`` key of the FAISS index of ``version`` (default: the live one), or None."""
    version = index_version(meta) if version is None else version
    return None if version is None else f"{_version_dir(version)}/{INDEX_FILE}"


def index_sha256(meta: dict, version: int | None = None) -> str:
    """sha256 of an index version's FAISS file ("" without an index): names the oracle set."""
    key = index_file_key(meta, version)
    return meta.get("files", {}).get(key, "") if key else ""


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the run's write lock: two index changes (two CLI calls, two replicas of a service)
    must not both read version N and both write N + 1, losing one change."""
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)  # the directory itself: no lock file
    except FileNotFoundError:
        raise DundiError(f"{run_dir} is not a DunDi run (no such directory)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def commit_version(run_dir: Path, index: OracleIndex, **meta_fields: Any) -> dict:
    """Write ``index`` as the next version and commit it in run.json; the caller holds the run
    lock (:func:`run_lock`)."""
    meta = read_meta(run_dir)
    index.meta["weights_sha256"] = meta["files"][WEIGHTS_FILE]
    version = max(index_versions(meta), default=0) + 1
    name = _version_dir(version)
    staging = run_dir / ORACLE_DIR / f".v{version}.tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    index.save(staging)
    shutil.rmtree(run_dir / name, ignore_errors=True)  # uncommitted: a killed earlier write
    os.replace(staging, run_dir / name)
    files = dict(meta["files"])
    for fname in (INDEX_FILE, META_FILE):
        files[f"{name}/{fname}"] = sha256_file(run_dir / name / fname)
    oracle = {k: v for k, v in index.meta.items() if k != "ids"}
    meta.update(meta_fields, files=files, oracle={**oracle, "version": version})
    atomic_write_json(run_dir / RUN_FILE, meta)  # the commit point
    return meta


def save_oracle(run_dir: str | os.PathLike, index: OracleIndex, **meta_fields: Any) -> dict:
    """Write ``index`` as the run's next index version and make it live (see the module
    docstring); ``meta_fields`` are merged into run.json in the same atomic write."""
    with run_lock(run_dir):
        return commit_version(Path(run_dir), index, **meta_fields)


def update_live_oracle(run_dir: str | os.PathLike, index_sha: str, **fields: Any) -> bool:
    """Merge ``fields`` into the live index version's record in run.json under the run's write
    lock, if that version is still the index file ``index_sha``; False, and nothing written,
    if the index changed meanwhile. For facts measured on one oracle set (a calibrated abstain
    rule) that must never be stored with another: every index change replaces that record."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        meta = read_meta(run_dir)
        if index_sha256(meta) != index_sha:
            return False
        meta["oracle"] = {**meta["oracle"], **fields}
        atomic_write_json(run_dir / RUN_FILE, meta)  # the commit point
    return True


def load_oracle(run_dir: str | os.PathLike, meta: dict | None = None,
                version: int | None = None) -> OracleIndex:
    """The run's live index version (or ``version``), every file verified against run.json."""
    run_dir = Path(run_dir)
    meta = meta or read_meta(run_dir)
    if index_version(meta) is None:
        raise DundiError(f"{run_dir} has no oracle index yet: run `dundi index build {run_dir}`")
    if version is not None and version not in index_versions(meta):
        raise DundiError(f"{run_dir} has no index version {version}: it holds versions "
                         f"{', '.join(map(str, index_versions(meta)))} (see `dundi index list {run_dir}`)")
    name = _version_dir(index_version(meta) if version is None else version)
    for fname in (INDEX_FILE, META_FILE):
        _verify(run_dir, meta, f"{name}/{fname}")
    index = OracleIndex.load(run_dir / name)
    if index.meta.get("weights_sha256") != meta["files"][WEIGHTS_FILE]:
        raise DundiError(f"{run_dir}: the oracle index was built with other weights than the "
                         f"run's model; rebuild it with `dundi index build {run_dir}`")
    if "class_names" not in json.loads((run_dir / name / META_FILE).read_text()):
        # written before indexes stored names: its classes are the run's trained classes
        index = OracleIndex(index.vectors, counts=index.class_counts(), meta=index.meta,
                            class_names=list(dataset_class_names(meta)), metric=index.metric)
    return index


def dataset_classes_of(meta: dict, oracle_meta: dict | None = None) -> list[int] | None:
    """Per class of the oracle index (``oracle_meta``, default the live one recorded in
    run.json): the dataset class it stands for, -1 for a class enrolled from other images;
    None for a run that answers with the dataset's own labels."""
    oracle_meta = (meta.get("oracle") or {}) if oracle_meta is None else oracle_meta
    recorded = oracle_meta.get("dataset_classes", meta.get("dataset_classes"))
    return None if recorded is None else [int(c) for c in recorded]


def dataset_class_names(meta: dict) -> tuple[str, ...]:
    """Names of a run's classes in its label order: the dataset's names (of the classes it
    was trained on, for a run with held-out classes), else "0".."C-1"."""
    from dundi.data import DATASETS

    names = list(getattr(DATASETS.get(meta.get("dataset")), "class_names", None) or [])
    kept = meta.get("dataset_classes", range(int(meta["num_classes"])))
    if len(names) <= max(kept, default=0) or len(set(names)) != len(names):
        return tuple(str(c) for c in range(int(meta["num_classes"])))
    return tuple(names[int(c)] for c in kept)


def save_shape_basis(run_dir: str | os.PathLike, basis: ShapeBasis) -> dict:
    """Write the run's shape basis (:mod:`dundi.rule.shape_signal`) and record its sha256 in
    run.json, under the run's lock; returns the new run.json."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        save_basis(run_dir / SHAPE_FILE, basis)
        meta = read_meta(run_dir)
        return update_meta(run_dir, files={**meta.get("files", {}), SHAPE_FILE: sha256_file(run_dir / SHAPE_FILE)})


def load_shape_basis(run_dir: str | os.PathLike, meta: dict) -> ShapeBasis | None:
    """The run's shape basis, verified against run.json (None: the run has none yet)."""
    if SHAPE_FILE not in meta.get("files", {}):
        return None
    return load_basis(_verify(Path(run_dir), meta, SHAPE_FILE))
