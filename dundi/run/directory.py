"""Run directories: weights (safetensors), oracle index (FAISS format), metadata (JSON).

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
import dataclasses
import fcntl
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dundi.data import pixels
from dundi.errors import DundiError
from dundi.files import atomic_write_json, sha256_file
from dundi.nets.inference import EMBED_BATCH
from dundi.nets.models import build_distance_net, build_native
from dundi.rule.index import INDEX_FILE, META_FILE, OracleIndex
from dundi.rule.params import TwoStepResult
from dundi.rule.params import TwoStepRule

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


def _write_version(run_dir: Path, index: OracleIndex, **meta_fields: Any) -> dict:
    """Write ``index`` as the next version and commit it in run.json. Hold the run lock."""
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
        return _write_version(Path(run_dir), index, **meta_fields)


def change_oracle(run_dir: str | os.PathLike, change: Callable[["Run"], dict]) -> dict:
    """Read-modify-write of the live index under the run's lock: ``change`` gets the loaded,
    verified run, changes ``run.oracle`` in place (or raises DundiError: nothing is written)
    and returns run.json fields to merge; the index is written as the next version."""
    with run_lock(run_dir):
        run = Run.load(run_dir)
        fields = change(run)
        return _write_version(Path(run_dir), run.oracle, **fields)


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


def save_calibration(run_dir: str | os.PathLike, calibration: dict, source: str, index_sha: str) -> None:
    """Store an abstain rule calibrated on the index file ``index_sha`` with the live index's
    metadata in run.json, under the run's write lock. Every index change (build, add, remove)
    replaces that metadata, and the rule names the index file it was measured on, so a
    threshold never outlives the oracles it was measured against."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        meta = read_meta(run_dir)
        if index_sha256(meta) != index_sha:
            raise DundiError(f"the oracle index of {run_dir} changed while calibrating (or a pinned "
                             f"version was calibrated): calibrate the live index again")
        record = {**calibration, "source": source, "index_sha256": index_sha}
        meta["oracle"] = {**meta["oracle"], "abstain": record}
        atomic_write_json(run_dir / "run.json", meta)


def stored_calibration(meta: dict, rule: TwoStepRule, index_sha: str) -> dict | None:
    """The abstain rule stored for the index file ``index_sha`` under this resolved two-step
    rule (distances depend on n, m, k and the index), or None."""
    cal = (meta.get("oracle") or {}).get("abstain")
    if cal and (cal.get("n"), cal.get("m"), cal.get("k"), cal.get("index_sha256")) == \
            (rule.n, rule.m, rule.k, index_sha):
        return cal
    return None


def validate_images(images: Any, in_shape: tuple[int, ...]) -> np.ndarray:
    """Check images for a model taking ``in_shape`` = (C, H, W) and return them as a
    (N, C, H, W) float32 batch in [0, 1], or raise one :class:`DundiError` naming the problem.

    The rules are dundi/data/pixels.py's, the HTTP service's too, so the Python API and the
    service accept and refuse the same inputs. Here the array's dtype says what the pixels
    are: uint8 arrays are 8-bit pixels, float arrays are pixels in [0, 1], anything else is
    refused. An empty batch of the right shape is returned empty.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    try:
        arr = np.asarray(images)
    except (ValueError, TypeError):
        raise DundiError("the images are a ragged sequence (rows of different lengths): pass a numpy "
                         "array of float pixels in [0, 1]") from None
    batch = pixels.as_batch(arr, in_shape, "the images")
    if arr.dtype == np.uint8:
        return pixels.from_8bit(batch, "the images")
    return pixels.from_float(batch, "the images", "8-bit pixels: divide by 255, or pass a uint8 array")


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


@dataclasses.dataclass
class Run:
    """A loaded run: model, metadata and (for DunDi runs) the oracle index."""

    path: Path
    model: nn.Module
    meta: dict
    oracle: OracleIndex | None = None

    @classmethod
    def load(cls, run_dir: str | os.PathLike, with_oracle: bool = True,
             index_version: int | None = None) -> "Run":
        """Load and verify a run; ``index_version`` pins an oracle index version (default:
        the live one), so a service can name exactly which oracle set answers."""
        model, meta = load_model(run_dir)
        oracle = (load_oracle(run_dir, meta, index_version)
                  if with_oracle and meta["kind"] == "dundi" else None)
        return cls(Path(run_dir), model, meta, oracle)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The name of every class the run answers with, by label: the oracle index's names
        (enrolled classes included) for DunDi runs, the dataset's for native runs."""
        if self.oracle is not None:
            return tuple(self.oracle.class_names)
        return dataset_class_names(self.meta)

    @property
    def device(self) -> str:
        """The device type the model computes on ("cpu", "cuda")."""
        return next((p.device.type for p in self.model.parameters()), "cpu")

    def embed(self, images: np.ndarray, batch_size: int = EMBED_BATCH) -> np.ndarray:
        """Embeddings (B, D) float32. A run ranking by squared Euclidean distance (certifiable)
        embeds through :func:`dundi.rule.exact.embed_invariant`, so an image's embedding -- and
        so its answer and certificate -- is the same bits in any batch."""
        if self.oracle is not None and self.oracle.metric == "sqeuclidean":
            from dundi.nets.bounds import layers_of
            from dundi.rule.exact import embed_invariant

            self.model.eval()
            return embed_invariant(layers_of(self.model), images, min(batch_size, 256))
        from dundi.nets.inference import forward_batched

        return forward_batched(self.model, images, batch_size)

    def classify(self, images: np.ndarray | torch.Tensor, rule: TwoStepRule | None = None,
                 batch_size: int = EMBED_BATCH) -> TwoStepResult:
        """Classify raw images: Algorithm 1 for DunDi runs, the argmax of the logits for native runs.

        ``images`` are float pixels in [0, 1] (or uint8 pixels 0..255, converted to ``k / 255``
        as the dataset cache does), shaped like the run's ``in_shape`` (C, H, W) with or without
        the batch axis; single-channel runs also take (N, H, W) and (H, W). Anything else is
        refused with one :class:`DundiError` saying what is expected — the same contract as the
        HTTP server, because a 0..255 image classified as if it were [0, 1] gets a confident,
        wrong answer instead of an error. The result always has a batch axis (B = 1 for one
        image).

        DunDi runs answer under ``rule`` (:class:`dundi.rule.params.TwoStepRule`; by default n
        is every oracle in the index, m min(3, n) -- the paper's setting -- and k = 5). Native
        runs have no oracles, so a rule's n and m are refused; their result holds the top
        ``rule.k`` classes by logit with the logits as both coarse and fine scores, and NaN as
        the nearest-oracle distance.
        """
        if batch_size < 1:
            raise DundiError(f"batch_size={batch_size} must be at least 1")
        batch = validate_images(images, tuple(self.meta["in_shape"]))
        rule = rule or TwoStepRule()
        if self.meta["kind"] == "native":
            return self._classify_native(batch, rule, batch_size)
        if self.oracle is None:
            raise DundiError(f"{self.path} was loaded without its oracle index: load it with "
                             f"Run.load(path) (with_oracle=True), after `dundi index build {self.path}`")
        rule = self.oracle.resolve(rule)
        if len(batch) == 0:  # the model would give (0, 0) embeddings; the index answers empty
            return self.oracle.classify(np.zeros((0, self.oracle.dim), np.float32), rule)
        return self.oracle.classify(self.embed(batch, batch_size), rule)

    def _classify_native(self, batch: np.ndarray, rule: TwoStepRule, batch_size: int) -> TwoStepResult:
        """The native model's answer in the shape of a two-step result, so code written for
        DunDi runs (labels, top-k with scores) reads a native run's answers unchanged."""
        if rule.n is not None or rule.m is not None or rule.metric is not None:
            raise DundiError(f"{self.path} is a native run: it has no oracles, so n, m and the metric "
                             f"do not apply; omit them (it classifies by the argmax of its logits)")
        classes, k = int(self.meta["num_classes"]), rule.k
        if not 1 <= k <= classes:
            raise DundiError(f"k={k} must be between 1 and the number of classes ({classes})")
        if len(batch) == 0:
            logits = np.zeros((0, classes), np.float32)
        else:
            from dundi.nets.inference import forward_batched

            logits = forward_batched(self.model, batch, batch_size)
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int64)  # ties: lower class
        scores = np.take_along_axis(logits, top, 1).astype(np.float64)
        return TwoStepResult(top[:, 0].copy(), top, scores, scores.copy(),
                             np.full(len(batch), np.nan))

    def as_module(self, rule: TwoStepRule | None = None) -> nn.Module:
        """This DunDi run as a plain ``torch.nn.Module``, images (N, C, H, W) → (N, classes)
        scores whose argmax is Algorithm 1's label under ``rule`` for every input, ties
        included, differentiable like the adaptive stand-in: for outside attack tools
        (:mod:`dundi.run.export`; ``dundi export`` writes it as TorchScript)."""
        from dundi.run.export import build_module

        return build_module(self, rule)

    def certifier(self, rule: TwoStepRule | None = None):
        """A :class:`dundi.robustness.certificate.Certifier` for this run's ``rule``. Only runs
        whose rule uses the squared Euclidean distance can be certified (train with --certified).
        A native run gets a :class:`dundi.robustness.native_certificate.SoftmaxCertifier` for
        the argmax of its logits (``rule`` may only give k, which does not change the answer).
        Refuses, naming the setting, where the process's float32 arithmetic is not the one the
        certificate assumes (:func:`dundi.nets.arithmetic.check_arithmetic`)."""
        from dundi.nets.arithmetic import check_arithmetic
        from dundi.robustness.certificate import Certifier

        if self.meta.get("kind") == "native":
            from dundi.robustness.native_certificate import SoftmaxCertifier

            if rule is not None and (rule.n is not None or rule.m is not None or rule.metric is not None):
                raise DundiError(f"{self.path} is a native run: it has no oracles, so n, m and the metric "
                                 f"do not apply; omit them (its answer is the argmax of its logits)")
            check_arithmetic(certified=True, device=self.device)
            return SoftmaxCertifier(self.model)
        if self.oracle is None:
            raise DundiError(f"{self.path} has no oracle index: only DunDi runs can be certified")
        if self.oracle.metric != "sqeuclidean":
            raise DundiError(f"{self.path} ranks by {self.oracle.metric} distance; certificates are "
                             f"for the squared-Euclidean rule: train with `dundi train --certified`")
        rule = self.oracle.resolve(rule)
        n, counts = rule.n, self.oracle.class_counts()
        if counts.min() < n:
            raise DundiError(f"{self.path}: certificates need every class to hold at least n={n} "
                             f"oracles; the index's classes hold {int(counts.min())} to "
                             f"{int(counts.max())} (use n <= {int(counts.min())})")
        check_arithmetic(certified=True, device=self.device)
        return Certifier(self.model, self.oracle_tensor(n), rule)

    def oracle_tensor(self, n: int | None = None) -> torch.Tensor:
        """Oracle embeddings (C, n, D) for the differentiable scorer.

        A class holding c < n oracles (enrolled from a few images) repeats its own oracles
        cyclically: where c divides n, its summed similarity over the n rows is n/c times its
        sum, which is exactly the rule's mean × n (:mod:`dundi.rule.index`), and its first m rows
        are the rule's min(m, c) coarse oracles when c = 1 or c >= m. Otherwise the stand-in
        approximates the rule; evaluations judge every answer by the rule itself and report
        how often the two disagree."""
        assert self.oracle is not None, "no oracle index loaded"
        n = n or self.oracle.n
        counts = self.oracle.class_counts()
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rows = starts[:, None] + np.arange(n)[None, :] % counts[:, None]
        return torch.from_numpy(np.ascontiguousarray(self.oracle.vectors[rows]))
