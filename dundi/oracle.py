"""The oracle database as a FAISS index, and Algorithm 1 (two-step classification) over it.

Oracle embeddings are stored class-major: row ``c * n + j`` is oracle ``j`` of class ``c``,
so a class's oracles are one contiguous id block. The per-class restriction of the fine step
reads those blocks directly instead of relying on FAISS ID selectors, which GPU indexes
silently ignore.

Similarity is the negative distance, and a class score is the sum of similarities to that
class's oracles (see docs/ARCHITECTURE.md). The distance is a run setting (``metric``):
``euclidean`` (the paper's) or ``sqeuclidean`` (squared Euclidean, under which every score
difference is linear in the embedding and the rule can be certified: docs/certification.md).
Ties break towards the lower class index.

Step 1 (coarse) scores every class over its first ``m`` oracles. While the coarse set is
small (``num_classes * m <= exact_coarse_limit``) FAISS computes all those distances exactly
(on the GPU where there is one). Beyond that, an IVF index over each class's coarse centroid
(the mean of its first m oracles) shortlists candidate classes, and only those are scored
exactly by Algorithm 1's coarse sum; this keeps the two-step rule cheap with 100,000 classes.
Step 2 (fine) scores the top ``k`` classes over their first ``n`` oracles and returns the argmax.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import faiss
import numpy as np

from dundi.errors import DundiError
from dundi.rule import COARSE_ORACLES, KEPT_CLASSES

INDEX_FILE = "index.faiss"
META_FILE = "oracle.json"


@dataclasses.dataclass
class TwoStepResult:
    """Per query: the label, the classes kept by step 1 with their coarse scores (best first),
    the fine scores of those classes (same order), and the distance to the nearest oracle
    among the kept classes' n oracles."""

    labels: np.ndarray          # (B,) int64
    topk_classes: np.ndarray    # (B, k) int64
    coarse_scores: np.ndarray   # (B, k) float64
    fine_scores: np.ndarray     # (B, k) float64
    nearest_distance: np.ndarray  # (B,) float64


METRICS = ("euclidean", "sqeuclidean")


def check_metric(metric: str) -> str:
    """Refuse an unknown distance name with the accepted ones."""
    if metric not in METRICS:
        raise DundiError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    return metric


def _finish_distance(d2: np.ndarray, squared: bool) -> np.ndarray:
    """Squared distances as computed (clipped at 0), or their square roots."""
    d2 = np.maximum(d2, 0.0, out=d2)
    return d2 if squared else np.sqrt(d2, out=d2)


def _distances(queries: np.ndarray, vectors: np.ndarray, squared: bool = False) -> np.ndarray:
    """Exact Euclidean (or squared) distances (B, N) computed by FAISS (GPU where present)."""
    if faiss.get_num_gpus() > 0:  # pragma: no cover - needs a GPU
        res = faiss.StandardGpuResources()
        d2 = faiss.pairwise_distance_gpu(res, queries, vectors)
    else:
        d2 = faiss.pairwise_distances(queries, vectors)
    return _finish_distance(d2, squared)


def _block_distances(queries: np.ndarray, blocks: np.ndarray, sq_norms: np.ndarray,
                     squared: bool = False) -> np.ndarray:
    """Euclidean (or squared) distances (B, K, n) of each query to its own K gathered blocks.

    queries (B, D), blocks (B, K, n, D), sq_norms (B, K, n) the blocks' squared norms.
    ‖q − o‖² = ‖q‖² + ‖o‖² − 2 q·o with one batched matrix product, as FAISS does.
    """
    b, kk, n, d = blocks.shape
    dots = np.matmul(blocks.reshape(b, kk * n, d), queries[:, :, None]).reshape(b, kk, n)
    d2 = (sq_norms + (queries * queries).sum(1)[:, None, None] - 2 * dots).astype(np.float64)
    return _finish_distance(d2, squared)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first, ties to the lower index."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


class OracleIndex:
    """n oracle embeddings for each of C classes, with Algorithm 1 over them."""

    def __init__(self, vectors: np.ndarray, num_classes: int, *, full_limit: int = 4096,
                 exact_coarse_limit: int = 65536,
                 shortlist: int | None = None, nprobe: int | None = None, meta: dict | None = None,
                 metric: str = "euclidean"):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) % num_classes:
            raise DundiError(f"oracle vectors of shape {vectors.shape} do not split into "
                             f"{num_classes} equal class blocks")
        self.num_classes = num_classes
        self.n = len(vectors) // num_classes
        self.dim = vectors.shape[1]
        self.blocks = vectors.reshape(num_classes, self.n, self.dim)
        self.sq_norms = (self.blocks ** 2).sum(-1)
        self.full_limit = full_limit
        self.exact_coarse_limit = exact_coarse_limit
        self.shortlist = shortlist
        self.nprobe = nprobe
        self.metric = check_metric(metric)
        self.squared = metric == "sqeuclidean"
        self.meta = {**(meta or {}), "metric": metric}
        self._coarse: dict[int, faiss.Index] = {}

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, labels: np.ndarray, num_classes: int,
                        **kw) -> "OracleIndex":
        """Arrange labelled embeddings (the same number per class) into class-major blocks,
        keeping each class's given order (the first m are the coarse oracles)."""
        labels = np.asarray(labels)
        counts = np.bincount(labels, minlength=num_classes)
        if counts.min() != counts.max() or counts.min() == 0:
            raise DundiError(f"every class needs the same number (>0) of oracles; got {counts.tolist()}")
        order = np.argsort(labels, kind="stable")
        return cls(np.asarray(embeddings)[order], num_classes, **kw)

    # ---- the two steps -------------------------------------------------------------------
    def _coarse_index(self, m: int) -> faiss.Index:
        """IVF index over each class's coarse centroid (mean of its first m oracles), built
        once per m. It only shortlists candidate classes; their coarse scores are exact."""
        if m not in self._coarse:
            centroids = np.ascontiguousarray(self.blocks[:, :m].mean(1))
            # ~4·sqrt(C) lists, but never so few points that k-means lacks 64 per centroid
            nlist = int(max(1, min(4 * np.sqrt(len(centroids)), len(centroids) // 64)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.dim), self.dim, nlist)
            rng = np.random.default_rng(0)
            index.train(centroids[rng.choice(len(centroids), min(len(centroids), 64 * nlist), replace=False)])
            index.add(centroids)
            # Probing 1/8 of the lists: ≥ 99 % top-1 agreement with exact search on synthetic
            # classes as tight as face embeddings (bench/classify_scale.py); looser classes
            # need more probes (nprobe=nlist/4 at noise 1.0). Tune with ``nprobe``.
            index.nprobe = self.nprobe or max(16, nlist // 8)
            if faiss.get_num_gpus() > 0:  # pragma: no cover - needs a GPU
                index = faiss.index_cpu_to_all_gpus(index)
            self._coarse[m] = index
        return self._coarse[m]

    def _step1(self, q: np.ndarray, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k classes (B, k) and their coarse scores over the first m oracles."""
        if self.num_classes * m <= self.exact_coarse_limit:
            coarse = np.ascontiguousarray(self.blocks[:, :m].reshape(-1, self.dim))
            scores = -_distances(q, coarse, self.squared).reshape(len(q), self.num_classes, m).sum(-1)
            top = _top_k(scores, k)
            return top, np.take_along_axis(scores, top, 1)
        _, cand = self._coarse_index(m).search(q, self.shortlist or max(8 * k, 64))
        cand = np.sort(cand, axis=1)  # -1 (a missing hit) first; ties then go to the lower class
        safe = np.maximum(cand, 0)
        dist = _block_distances(q, self.blocks[safe, :m], self.sq_norms[safe, :m], self.squared)
        scores = np.where(cand < 0, -np.inf, -dist.sum(-1))
        top = _top_k(scores, k)
        return np.take_along_axis(cand, top, 1), np.take_along_axis(scores, top, 1)

    def classify(self, queries: np.ndarray, n: int | None = None, m: int = COARSE_ORACLES, k: int = KEPT_CLASSES
                 ) -> TwoStepResult:
        """Algorithm 1 for a batch of query embeddings (B, D)."""
        n = self.n if n is None else n
        self.check_params(n, m, k)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DundiError(f"queries must have shape (batch, {self.dim}); got {q.shape}")
        if len(q) == 0:
            empty = np.zeros((0, k))
            return TwoStepResult(np.zeros(0, np.int64), empty.astype(np.int64), empty, empty, np.zeros(0))
        parts = [self._classify_chunk(q[i:i + self.CHUNK], n, m, k)
                 for i in range(0, len(q), self.CHUNK)]
        if len(parts) == 1:
            return parts[0]
        fields = [f.name for f in dataclasses.fields(TwoStepResult)]
        return TwoStepResult(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))

    CHUNK = 512  # queries per step: bounds the (chunk, k, n, D) float64 fine-step buffer

    def _classify_chunk(self, q: np.ndarray, n: int, m: int, k: int) -> TwoStepResult:
        if self.num_classes * self.n <= self.full_limit:
            # Few oracles in all: one exact FAISS distance matrix serves both steps, so the
            # two-step rule costs about what brute force costs.
            dist = _distances(q, self.blocks.reshape(-1, self.dim), self.squared).reshape(len(q), self.num_classes, self.n)
            coarse = -dist[:, :, :m].sum(-1)
            top = _top_k(coarse, k)
            coarse_scores = np.take_along_axis(coarse, top, 1)
            fine = np.take_along_axis(-dist[:, :, :n].sum(-1), top, 1)
            nearest = np.take_along_axis(dist[:, :, :n], top[:, :, None], 1).min(axis=(1, 2))
        else:
            top, coarse_scores = self._step1(q, m, k)
            safe = np.maximum(top, 0)  # the IVF shortlist may find fewer than k classes (-1)
            fine_dist = _block_distances(q, self.blocks[safe, :n], self.sq_norms[safe, :n], self.squared)
            fine = np.where(top >= 0, -fine_dist.sum(-1), -np.inf)
            nearest = np.where(top[:, :, None] >= 0, fine_dist, np.inf).reshape(len(q), -1).min(1)
        if self.squared:  # report a distance whatever the metric ranks by
            nearest = np.sqrt(nearest)
        best = np.argmax(fine, axis=1)  # first maximum: ties go to the better coarse rank
        labels = top[np.arange(len(q)), best]
        return TwoStepResult(labels.astype(np.int64), top.astype(np.int64), coarse_scores, fine,
                             nearest)

    @staticmethod
    def select(labels: np.ndarray, n: int, seed: int, num_classes: int) -> np.ndarray:
        """Indices of n random samples per class (seeded), class-major: the oracle database."""
        rng = np.random.default_rng(seed)
        picks = []
        for c in range(num_classes):
            members = np.flatnonzero(np.asarray(labels) == c)
            if len(members) < n:
                raise DundiError(f"class {c} has {len(members)} samples, fewer than n={n} oracles")
            picks.append(rng.choice(members, n, replace=False))
        return np.concatenate(picks).astype(np.int64)

    def check_params(self, n: int, m: int, k: int) -> None:
        """Refuse (n, m, k) this index cannot honour, saying what would work."""
        if n < 1:
            raise DundiError(f"n={n} is out of range: n is the number of oracles per class in the "
                             f"fine step, at least 1 and at most {self.n} (what this index holds)")
        if n > self.n:
            raise DundiError(f"n={n} is out of range: this index holds {self.n} oracles per class; "
                             f"use n <= {self.n}, or rebuild the index with more "
                             f"(`dundi index build RUN --oracles {n}`)")
        if not 1 <= m <= n:
            raise DundiError(f"m={m} must be between 1 and n={n} (the coarse step's oracles per class "
                             f"are the first m of the fine step's n)")
        if not 1 <= k <= self.num_classes:
            raise DundiError(f"k={k} must be between 1 and the number of classes ({self.num_classes})")

    # ---- persistence ---------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> dict[str, str]:
        """Write the index (FAISS format) and JSON metadata atomically; returns file names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        flat = faiss.IndexFlatL2(self.dim)
        flat.add(np.ascontiguousarray(self.blocks.reshape(-1, self.dim)))
        tmp = directory / (INDEX_FILE + ".tmp")
        faiss.write_index(flat, str(tmp))
        os.replace(tmp, directory / INDEX_FILE)
        meta = {**self.meta, "num_classes": self.num_classes, "n": self.n, "dim": self.dim,
                "layout": "class-major: row c*n+j is oracle j of class c"}
        tmp = directory / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, directory / META_FILE)
        return {"index": INDEX_FILE, "meta": META_FILE}

    @classmethod
    def load(cls, directory: str | os.PathLike, **kw) -> "OracleIndex":
        """Read an index written by :meth:`save` (FAISS's own format, no pickle)."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            flat = faiss.read_index(str(directory / INDEX_FILE))
        except (OSError, RuntimeError, ValueError) as exc:
            raise DundiError(f"cannot read the oracle index in {directory}: {exc}. "
                             f"Build it with `dundi index build RUN`.") from exc
        vectors = flat.reconstruct_n(0, flat.ntotal)
        if flat.ntotal != meta["num_classes"] * meta["n"] or flat.d != meta["dim"]:
            raise DundiError(f"oracle index in {directory} does not match its metadata")
        return cls(vectors, meta["num_classes"], meta=meta, metric=meta.get("metric", "euclidean"), **kw)
