"""Two-step classification vs exact brute force as the number of classes grows.

Synthetic oracle sets: C classes × 20 oracles × 128-d (class centre ~ N(0, I) + noise
~ N(0, σ²I)); queries drawn around random class centres. The default σ = 0.7 makes the
ratio of within-class to between-class distances ≈ 0.57, about what face-recognition
embeddings show; σ = 1.0 (ratio 0.71) is a harder, looser setting. Isotropic 128-d data is
the worst case for any partitioning index, so these figures are conservative. In one run, for C = 10, 1,000 and 100,000:
queries/s of the two-step classifier (n=20, m=3, k=5) and of exact brute force over all
oracles (every class scored over all n oracles, i.e. Algorithm 1 with k = C), the speed
ratio and top-1 agreement. Targets: ≥ 20× and ≥ 99 % agreement at 100,000 classes; not
slower at 10 classes.

    python bench/classify_scale.py [--classes 10 1000 100000] [--queries 2000]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from dundi.oracle import OracleIndex

N, M, K, DIM = 20, 3, 5, 128


def brute_force(index: OracleIndex, queries: np.ndarray, batch: int = 64) -> np.ndarray:
    """Exact: sum of distances to all n oracles of every class, argmin (FAISS distances)."""
    flat = np.ascontiguousarray(index.blocks.reshape(-1, index.dim))
    out = []
    for i in range(0, len(queries), batch):
        d2 = faiss.pairwise_distances(queries[i:i + batch], flat)
        sums = np.sqrt(np.maximum(d2, 0)).reshape(len(d2), index.num_classes, index.n).sum(-1)
        out.append(np.argmin(sums, axis=1))
    return np.concatenate(out)


def timed(fn, *args) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def run(classes: int, n_queries: int, noise: float, nprobe: int | None, rng: np.random.Generator) -> dict:
    centres = rng.normal(size=(classes, 1, DIM)).astype(np.float32)
    oracles = (centres + noise * rng.normal(size=(classes, N, DIM)).astype(np.float32))
    truth = rng.integers(classes, size=n_queries)
    queries = (centres[truth, 0] + noise * rng.normal(size=(n_queries, DIM))).astype(np.float32)
    index = OracleIndex(oracles.reshape(-1, DIM), classes, nprobe=nprobe)
    t_build, _ = timed(index.classify, queries[:8], N, M, K)  # builds the IVF index when used
    # brute force is slow at 100k classes: time it on a subset, compare on that subset
    nb = n_queries if classes <= 1000 else min(n_queries, 500)
    t_two, two = timed(lambda q: index.classify(q, N, M, K).labels, queries)
    t_brute, brute = timed(brute_force, index, queries[:nb])
    qps_two, qps_brute = n_queries / t_two, nb / t_brute
    return {"classes": classes, "two_step_qps": qps_two, "brute_qps": qps_brute,
            "ratio": qps_two / qps_brute, "agreement": float((two[:nb] == brute).mean()),
            "two_step_accuracy": float((two == truth).mean()), "coarse": "exact" if classes * M <= index.exact_coarse_limit else "ivf",
            "setup_s": t_build}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 1000, 100_000])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--noise", type=float, default=0.7, help="within-class σ (centres are N(0, I))")
    ap.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: nlist/8)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"n={N} m={M} k={K} dim={DIM} noise={args.noise}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    print(f"{'classes':>8} {'coarse':>6} {'two-step q/s':>13} {'brute q/s':>10} {'ratio':>7} {'agree':>7} {'setup s':>8}")
    for c in args.classes:
        r = run(c, args.queries, args.noise, args.nprobe, rng)
        print(f"{r['classes']:>8} {r['coarse']:>6} {r['two_step_qps']:>13.0f} {r['brute_qps']:>10.0f} "
              f"{r['ratio']:>6.1f}x {r['agreement'] * 100:>6.2f}% {r['setup_s']:>8.1f}")


if __name__ == "__main__":
    main()
