"""Two-step classification vs flat (exact) search as the number of classes grows.

Synthetic oracle sets: C classes × 20 oracles × 128-d. Class centres ~ N(0, I), oracles and
queries = centre + N(0, σ²I); the default σ = 0.7 makes within-class distances ≈ 0.57 of
between-class ones, about what face-recognition embeddings show (σ = 1.0 is looser).
Isotropic 128-d data is the worst case for any partitioning index, so the figures are
conservative. For each C, in a child process of its own (so that its peak memory is its
own): build time of the two-step index (construction + its step-1 structure), queries/s of
the two-step rule (n=20, m=3, k=5) and of flat search (Algorithm 1 with k = C: every class
scored over all its oracles by FAISS distances, argmax), their ratio, top-1 agreement and
accuracy, agreement with the exact two-step rule (step 1 over every class: how much the
step-1 shortlist alone changes), and the child's peak resident memory. Flat search is timed on a query subset at
large C. Targets (issue 14): >= 50x flat with >= 99 % agreement at 100,000 classes; 1,000,000
classes builds and answers within 24 GiB; not slower than flat at 10 classes.

    python bench/classify_scale.py [--classes 10 1000 100000 1000000] [--queries 2000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import faiss
import numpy as np

from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.rule.search import top_k

N, M, K, DIM = 20, 3, 5, 128
RULE = TwoStepRule(N, M, K)
CLASS_CHUNK = 20_000  # classes generated / scanned at a time: bounds temporaries


def synthetic(classes: int, queries: int, noise: float, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Oracles (C·N, D) float32 written in place chunk by chunk (no full-size temporary),
    queries (Q, D) around random class centres, and their true classes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, DIM), dtype=np.float32)
    oracles = np.empty((classes * N, DIM), np.float32)
    for a in range(0, classes, CLASS_CHUNK):
        b = min(classes, a + CLASS_CHUNK)
        block = rng.standard_normal(((b - a) * N, DIM), dtype=np.float32)
        block *= noise
        block += np.repeat(centres[a:b], N, axis=0)
        oracles[a * N:b * N] = block
    truth = rng.integers(classes, size=queries)
    q = centres[truth] + noise * rng.standard_normal((queries, DIM), dtype=np.float32)
    return oracles, np.ascontiguousarray(q), truth


def flat(oracles: np.ndarray, classes: int, queries: np.ndarray, exact_rule: bool = False):
    """Exact Algorithm 1 with k = C: summed distance to all n oracles of every class, argmin,
    scanning the database in class-aligned chunks so the distance matrix stays small (at most
    2^24 entries, queries batched by up to 512 as the two-step index batches them).
    ``exact_rule`` also returns the exact two-step rule's labels (step 1 over every class's
    m coarse oracles) from the same distances; that is not part of the timed flat search."""
    batch = int(np.clip(2**24 // (min(classes, CLASS_CHUNK) * N), 16, 512))
    out, rule = [], []
    for i in range(0, len(queries), batch):
        q = queries[i:i + batch]
        sums = np.empty((len(q), classes), np.float64)
        coarse = np.empty((len(q), classes), np.float64) if exact_rule else None
        for a in range(0, classes, CLASS_CHUNK):
            b = min(classes, a + CLASS_CHUNK)
            d2 = faiss.pairwise_distances(q, oracles[a * N:b * N])
            d3 = np.sqrt(np.maximum(d2, 0)).reshape(len(q), b - a, N)
            sums[:, a:b] = d3.sum(-1)
            if exact_rule:
                coarse[:, a:b] = d3[:, :, :M].sum(-1)
        out.append(np.argmin(sums, axis=1))
        if exact_rule:
            top = top_k(-coarse, K)
            rule.append(top[np.arange(len(q)), np.argmin(np.take_along_axis(sums, top, 1), axis=1)])
    return (np.concatenate(out), np.concatenate(rule)) if exact_rule else np.concatenate(out)


def rate(fn, count: int, min_s: float = 1.0) -> tuple[float, np.ndarray]:
    """Items per second of ``fn()`` (repeated until ``min_s`` has passed: small sizes take
    milliseconds) and its result."""
    reps, t0 = 0, time.perf_counter()
    while True:
        result = fn()
        reps += 1
        if time.perf_counter() - t0 >= min_s:
            return reps * count / (time.perf_counter() - t0), result


def one(classes: int, n_queries: int, noise: float, flat_queries: int, nprobe: int | None) -> dict:
    oracles, queries, truth = synthetic(classes, n_queries, noise)
    t0 = time.perf_counter()
    index = OracleIndex(oracles, classes, nprobe=nprobe)
    index.classify(queries[:8], RULE)  # builds step 1's structure where it has one
    build = time.perf_counter() - t0
    qps_two, two = rate(lambda: index.classify(queries, RULE).labels, n_queries)
    nf = min(n_queries, flat_queries)
    qps_flat, ref = rate(lambda: flat(oracles, classes, queries[:nf]), nf)
    rule = flat(oracles, classes, queries[:nf], exact_rule=True)[1]
    structure = index._coarse.get(M)
    path = ("one-matrix" if classes * N <= index.full_limit else
            getattr(structure, "kind", "exact-coarse"))
    return {"classes": classes, "path": path, "build_s": build, "two_step_qps": qps_two,
            "flat_qps": qps_flat, "ratio": qps_two / qps_flat,
            "agreement": float((two[:nf] == ref).mean()),
            "rule_agreement": float((two[:nf] == rule).mean()), "flat_queries": nf,
            "accuracy": float((two == truth).mean()), "oracles_gib": oracles.nbytes / 2**30,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 1000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--flat-queries", type=int, default=None,
                    help="queries flat search is timed on (default: all up to 1,000 classes, "
                         "500 up to 100,000, 100 beyond)")
    ap.add_argument("--noise", type=float, default=0.7, help="within-class σ (centres are N(0, I))")
    ap.add_argument("--nprobe", type=int, default=None, help="step-1 IVF lists probed (default: 1/16)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.one is not None:
        nf = args.flat_queries or (args.queries if args.one <= 1000 else 500 if args.one <= 100_000 else 100)
        print(json.dumps(one(args.one, args.queries, args.noise, nf, args.nprobe)))
        return
    print(f"n={N} m={M} k={K} dim={DIM} noise={args.noise} nprobe={args.nprobe or 'nlist/16'}; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads", flush=True)
    print(f"{'classes':>8} {'step 1':>12} {'build s':>8} {'two-step q/s':>13} {'flat q/s':>9} "
          f"{'ratio':>8} {'agree':>8} {'rule':>8} {'(on)':>5} {'acc':>7} {'data GiB':>8} {'peak GiB':>8}", flush=True)
    for c in args.classes:
        cmd = [sys.executable, __file__, "--one", str(c), "--queries", str(args.queries),
               "--noise", str(args.noise)] + (["--flat-queries", str(args.flat_queries)] if args.flat_queries else []) \
            + (["--nprobe", str(args.nprobe)] if args.nprobe else [])
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"{r['classes']:>8} {r['path']:>12} {r['build_s']:>8.1f} {r['two_step_qps']:>13.0f} "
              f"{r['flat_qps']:>9.1f} {r['ratio']:>7.1f}x {r['agreement'] * 100:>7.2f}% {r['rule_agreement'] * 100:>7.2f}% {r['flat_queries']:>5} "
              f"{r['accuracy'] * 100:>6.2f}% {r['oracles_gib']:>8.2f} {r['peak_gib']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
