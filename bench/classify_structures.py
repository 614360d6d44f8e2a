"""Which FAISS structure under each step of the two-step rule: measured side by side in one run.

Step 1 (shortlist 64 candidate classes from per-class coarse centroids, then exact coarse
scores): IVF-Flat, IVF-SQ8, IVF-PQ 4-bit fast-scan (all ~8·sqrt(C) lists, 1/16 probed) and
HNSW (M=32, efSearch=128): queries/s and recall of the exact step-1 winner (the class with
the best coarse sum over all classes). Step 2 (score the k = 5 kept classes over their n = 20
oracles): FAISS IVF with one inverted list per class searched with
``faiss.contrib.ivf_tools.search_preassigned`` on exactly the k lists, vs reading the kept
classes' contiguous rows directly (dundi.rule.search.gathered): queries/s. Same synthetic
oracles as bench/classify_scale.py.

    python bench/classify_structures.py [--classes 100000] [--queries 2000]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
from classify_scale import DIM, K, M, N, synthetic
from faiss.contrib.ivf_tools import add_preassigned, search_preassigned

from dundi.rule.search import gathered


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def step1(classes: int, oracles: np.ndarray, queries: np.ndarray, shortlist: int = 64) -> None:
    blocks = oracles.reshape(classes, N, DIM)
    centroids = np.ascontiguousarray(blocks[:, :M].mean(1))
    sub = queries[:400]  # the exact winner by brute force over all coarse oracles
    coarse = np.ascontiguousarray(blocks[:, :M].reshape(-1, DIM))
    best = np.concatenate([np.sqrt(np.maximum(faiss.pairwise_distances(sub[i:i + 50], coarse), 0))
                           .reshape(-1, classes, M).sum(-1).argmin(1) for i in range(0, 400, 50)])
    nlist = int(max(1, min(8 * np.sqrt(classes), classes // 39)))
    specs = {"ivf-flat": f"IVF{nlist},Flat", "ivf-sq8": f"IVF{nlist},SQ8",
             "ivf-pq-fastscan": f"IVF{nlist},PQ{DIM // 2}x4fs", "hnsw": "HNSW32"}
    rng = np.random.default_rng(0)
    for name, spec in specs.items():
        index = faiss.index_factory(DIM, spec)
        t_build, _ = timed(lambda: (index.train(centroids[rng.choice(classes, min(classes, 40 * nlist), replace=False)])
                                    if not index.is_trained else None, index.add(centroids)))
        if name == "hnsw":
            index.hnsw.efSearch = 128
        else:
            index.nprobe = max(16, nlist // 16)
        t, (_, cand) = timed(lambda: index.search(queries, shortlist))
        recall = (cand[:400] == best[:, None]).any(1).mean()
        print(f"step 1  {name:16s} build {t_build:6.1f} s  {len(queries) / t:8.0f} q/s  "
              f"recall of the exact winner {recall * 100:6.2f}%", flush=True)


def step2(classes: int, oracles: np.ndarray, queries: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    kept = rng.integers(classes, size=(len(queries), K))
    sq = np.einsum("ij,ij->i", oracles, oracles)
    rows = kept[:, :, None] * N + np.arange(N)
    t_rows, _ = timed(lambda: [gathered(queries[i:i + 512], oracles, sq, rows[i:i + 512])
                               for i in range(0, len(queries), 512)])
    quantizer = faiss.IndexFlatL2(DIM)
    ivf = faiss.IndexIVFFlat(quantizer, DIM, classes)
    ivf.is_trained, ivf.nprobe = True, K
    t_add, _ = timed(lambda: add_preassigned(ivf, oracles, np.repeat(np.arange(classes), N)))
    t_ivf, _ = timed(lambda: [search_preassigned(ivf, queries[i:i + 512], K * N, kept[i:i + 512], None)
                              for i in range(0, len(queries), 512)])
    print(f"step 2  rows read directly        {len(queries) / t_rows:8.0f} q/s", flush=True)
    print(f"step 2  IVF list per class        {len(queries) / t_ivf:8.0f} q/s (add {t_add:.1f} s, "
          f"a second copy of the oracles); ratio rows/IVF {t_ivf / t_rows:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=2000)
    args = ap.parse_args()
    oracles, queries, _ = synthetic(args.classes, args.queries, 0.7)
    print(f"{args.classes} classes x {N} oracles x {DIM}-d, {args.queries} queries; faiss "
          f"{faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)
    step1(args.classes, oracles, queries)
    step2(args.classes, oracles, queries)


if __name__ == "__main__":
    main()
