"""FAISS search structures under the oracle index (:mod:`dundi.rule.index`).

Everything here computes distances or shortlists classes; the index itself (storage, class
names, Algorithm 1's scores) lives in :mod:`dundi.rule.index`. FAISS GPU resources are created
once per process (:func:`gpu_resources`): building a ``StandardGpuResources`` allocates
streams and a scratch pool, far too slow to do per call.
"""

from __future__ import annotations

import threading

import faiss
import numpy as np

_GPU_LOCK = threading.Lock()
_GPU_RES = None


def use_gpu() -> bool:
    """Whether FAISS sees a GPU (the GPU build of FAISS on a machine with one)."""
    return faiss.get_num_gpus() > 0


def gpu_resources():  # pragma: no cover - needs a GPU
    """The process's one ``faiss.StandardGpuResources``, created on first use."""
    global _GPU_RES
    with _GPU_LOCK:
        if _GPU_RES is None:
            _GPU_RES = faiss.StandardGpuResources()
        return _GPU_RES


def squared_pairwise(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Exact squared Euclidean distances (B, N) computed by FAISS (GPU where present), as
    computed (not clipped): :class:`dundi.rule.distance.Distance` finishes them."""
    if use_gpu():  # pragma: no cover - needs a GPU
        return faiss.pairwise_distance_gpu(gpu_resources(), queries, vectors)
    return faiss.pairwise_distances(queries, vectors)


def gathered(queries: np.ndarray, vectors: np.ndarray, sq_norms: np.ndarray,
             rows: np.ndarray) -> np.ndarray:
    """Squared distances (B, K, L) float64, as computed (not clipped), of each query to its own rows ``rows`` (B, K, L) of ``vectors``.

    ‖q − o‖² = ‖q‖² + ‖o‖² − 2 q·o with one batched product, as FAISS computes it. Reading
    rows by index (not through an ID selector) behaves the same whatever device holds the
    coarse structures.
    """
    b, kk, ll = rows.shape
    blocks = vectors[rows.reshape(b, kk * ll)]                      # (B, K·L, D)
    dots = np.einsum("bjd,bd->bj", blocks, queries).reshape(b, kk, ll)
    return (sq_norms[rows] + (queries * queries).sum(1)[:, None, None] - 2 * dots).astype(np.float64)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first, ties to the lower index.

    A partial selection (O(C) per row) finds each row's k largest; rows where the k-th
    value ties with one left out fall back to a full stable sort, so ties resolve exactly
    as ``np.argsort(-scores, kind="stable")[:, :k]`` resolves them.
    """
    if 4 * k >= scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    part = np.sort(np.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)  # ascending index
    vals = np.take_along_axis(scores, part, 1)
    order = np.take_along_axis(part, np.argsort(-vals, axis=1, kind="stable"), 1)
    tied = (scores >= vals.min(1, keepdims=True)).sum(1) > k
    if tied.any():
        order[tied] = np.argsort(-scores[tied], axis=1, kind="stable")[:, :k]
    return order


SHORTLIST_KINDS = ("ivfpq", "ivf")


class Shortlister:
    """Candidate classes for step 1 from one vector per class (its coarse centroid).

    Only a shortlist: the candidates' coarse scores are then computed exactly. Both kinds
    are FAISS IVF indexes over the class centroids (about 8·sqrt(C) k-means lists, ``nprobe``
    of them scanned). ``ivfpq`` stores 4-bit product-quantised codes scanned with SIMD
    (FAISS fast-scan): on a CPU it shortlisted 64 classes at about 5× the speed of ``ivf``
    with no loss of recall on 100,000 classes (bench/classify_scale.py); ``ivf`` stores the
    centroids themselves and is the kind that goes to the GPU. New classes are appended with
    :meth:`add`; ids are class indices in insertion order.
    """

    MIN_PQ_CLASSES = 256  # fewer classes than this cannot train 4-bit codes well: use ivf

    def __init__(self, centroids: np.ndarray, kind: str = "ivfpq", nprobe: int | None = None):
        count, self.dim = centroids.shape
        if kind == "ivfpq" and (self.dim % 2 or self.dim < 8 or count < self.MIN_PQ_CLASSES):
            kind = "ivf"
        self.kind = kind
        # ~8·sqrt(C) lists with at least 39 training centroids each (FAISS's k-means minimum)
        nlist = int(max(1, min(8 * np.sqrt(count), count // 39)))
        spec = f"IVF{nlist},PQ{self.dim // 2}x4fs" if kind == "ivfpq" else f"IVF{nlist},Flat"
        index = faiss.index_factory(self.dim, spec)
        index.cp.niter = 10  # k-means iterations: the lists only shortlist, so coarse is fine
        rng = np.random.default_rng(0)
        index.train(centroids[rng.choice(count, min(count, 40 * nlist), replace=False)])
        index.add(centroids)
        # Probing 1/16 of the lists kept the exact step-1 winner in the 64-class shortlist
        # for >= 99 % of queries on synthetic classes as tight as face embeddings
        # (bench/classify_scale.py); looser classes need more probes: tune with ``nprobe``.
        index.nprobe = min(nlist, nprobe or max(16, nlist // 16))
        if use_gpu() and kind == "ivf":  # pragma: no cover - needs a GPU
            index = faiss.index_cpu_to_gpu(gpu_resources(), 0, index)
        self.index = index

    def add(self, centroids: np.ndarray) -> None:
        """Append the centroids of newly enrolled classes (ids continue from the last)."""
        self.index.add(np.ascontiguousarray(centroids, dtype=np.float32))

    def search(self, queries: np.ndarray, size: int) -> np.ndarray:
        """(B, size) candidate class ids, -1 where fewer were found."""
        return self.index.search(queries, size)[1]
