"""Run directories: weights (safetensors), oracle index (FAISS format), metadata (JSON).

A run directory holds::

    run.json             kind, dataset, arch, config, seed, metrics, sha256 of every file
    model.safetensors    the model's state dict
    oracle/index.faiss   oracle embeddings (written by `dundi index build`)
    oracle/oracle.json   n, seed, oracle sample ids, sha256 of the weights they came from

Every file is written atomically (temporary file, then rename) and its sha256 recorded in
``run.json``; loading re-hashes and refuses a file that changed. Nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dundi.errors import DundiError
from dundi.models import build_distance_net, build_native
from dundi.oracle import INDEX_FILE, META_FILE, OracleIndex, TwoStepResult

RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
ORACLE_DIR = "oracle"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_meta(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DundiError(f"{run_dir} is not a DunDi run (no {RUN_FILE}); "
                         f"create one with `dundi train` or `dundi train-native`") from None
    except json.JSONDecodeError as exc:
        raise DundiError(f"{path} is not valid JSON ({exc}); the run is damaged") from None


def _verify(run_dir: Path, meta: dict, name: str) -> Path:
    path = run_dir / name
    expected = meta.get("files", {}).get(name)
    if expected is None:
        raise DundiError(f"{run_dir}: {name} is not recorded in {RUN_FILE}")
    if not path.exists():
        raise DundiError(f"{run_dir}: {name} is missing")
    if sha256_file(path) != expected:
        raise DundiError(f"{run_dir}: {name} does not match the sha256 recorded in {RUN_FILE}; "
                         f"it was modified or replaced after the run was written — refusing to load it")
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
        return build_native(meta["arch"], shape, meta["num_classes"])
    if meta["kind"] == "dundi":
        pretrained = build_native(meta["arch"], shape, meta["num_classes"]) if meta["mode"] == "P" else None
        return build_distance_net(meta["arch"], shape, meta["embed_dim"], pretrained=pretrained)
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


def save_oracle(run_dir: str | os.PathLike, index: OracleIndex) -> dict:
    """Write the oracle index into the run and record its hashes."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    index.meta["weights_sha256"] = meta["files"][WEIGHTS_FILE]
    index.save(run_dir / ORACLE_DIR)
    files = dict(meta["files"])
    for name in (INDEX_FILE, META_FILE):
        files[f"{ORACLE_DIR}/{name}"] = sha256_file(run_dir / ORACLE_DIR / name)
    return update_meta(run_dir, files=files, oracle={k: v for k, v in index.meta.items() if k != "ids"})


def load_oracle(run_dir: str | os.PathLike, meta: dict | None = None) -> OracleIndex:
    run_dir = Path(run_dir)
    meta = meta or read_meta(run_dir)
    if f"{ORACLE_DIR}/{INDEX_FILE}" not in meta.get("files", {}):
        raise DundiError(f"{run_dir} has no oracle index yet: run `dundi index build {run_dir}`")
    for name in (INDEX_FILE, META_FILE):
        _verify(run_dir, meta, f"{ORACLE_DIR}/{name}")
    index = OracleIndex.load(run_dir / ORACLE_DIR)
    if index.meta.get("weights_sha256") != meta["files"][WEIGHTS_FILE]:
        raise DundiError(f"{run_dir}: the oracle index was built with other weights than the "
                         f"run's model; rebuild it with `dundi index build {run_dir}`")
    return index


@dataclasses.dataclass
class Run:
    """A loaded run: model, metadata and (for DunDi runs) the oracle index."""

    path: Path
    model: nn.Module
    meta: dict
    oracle: OracleIndex | None = None

    @classmethod
    def load(cls, run_dir: str | os.PathLike, with_oracle: bool = True) -> "Run":
        model, meta = load_model(run_dir)
        oracle = load_oracle(run_dir, meta) if with_oracle and meta["kind"] == "dundi" else None
        return cls(Path(run_dir), model, meta, oracle)

    def embed(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        from dundi.inference import forward_batched

        return forward_batched(self.model, images, batch_size)

    def classify(self, images: np.ndarray, n: int | None = None, m: int = 3, k: int = 5,
                 batch_size: int = 1024) -> TwoStepResult:
        """Two-step classification of raw images (native runs: argmax of the logits)."""
        if self.oracle is None:
            raise DundiError(f"{self.path} is not a DunDi run with an oracle index")
        return self.oracle.classify(self.embed(images, batch_size), n=n, m=m, k=k)

    def certifier(self, n: int | None = None, m: int = 3, k: int = 5):
        """A :class:`dundi.certificate.Certifier` for this run's rule (n, m, k). Only runs whose
        rule uses the squared Euclidean distance can be certified (train with --certified)."""
        from dundi.certificate import Certifier

        if self.oracle is None:
            raise DundiError(f"{self.path} has no oracle index: only DunDi runs can be certified")
        if self.oracle.metric != "sqeuclidean":
            raise DundiError(f"{self.path} ranks by {self.oracle.metric} distance; certificates are "
                             f"for the squared-Euclidean rule: train with `dundi train --certified`")
        n = self.oracle.n if n is None else n
        self.oracle.check_params(n, m, k)
        return Certifier(self.model, self.oracle_tensor(n), n, m, k)

    def oracle_tensor(self, n: int | None = None) -> torch.Tensor:
        """Oracle embeddings (C, n, D) for the differentiable scorer."""
        assert self.oracle is not None, "no oracle index loaded"
        return torch.from_numpy(self.oracle.blocks[:, : (n or self.oracle.n)].copy())
