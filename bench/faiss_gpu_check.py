"""FAISS on the GPU against FAISS on the CPU: an index built on the GPU searches as the CPU
index does, and DunDi's oracle index answers Algorithm 1 the same on both.

Three checks on seeded data shaped like an oracle database (C classes x n oracles, D dims):

1. a flat L2 index built on the GPU (``index_cpu_to_gpu``) returns the CPU flat index's
   neighbours (ids equal where the k-th distance is not tied) and distances (float32 tolerance);
2. an IVF-flat index trained on the CPU and copied to the GPU, probing every list, returns
   the same neighbours as on the CPU;
3. :class:`dundi.rule.index.OracleIndex` (which searches on the GPU whenever FAISS sees one:
   exact distances and the step-1 shortlist) gives the float64 torch reference's labels.

Without a FAISS GPU build or a GPU it prints one ``SKIPPED`` line saying which and exits 0
(``--require-gpu``: exits 2 instead), so a CPU machine runs it as a dry check of the script.

    python bench/faiss_gpu_check.py [--classes 1000] [--oracles 20] [--dim 64] [--queries 2000]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def data(classes: int, oracles: int, dim: int, queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    vectors = (centres[:, None] + 0.5 * rng.normal(size=(classes, oracles, dim))).astype(np.float32)
    picks = rng.integers(classes, size=queries)
    qs = (centres[picks] + 0.5 * rng.normal(size=(queries, dim))).astype(np.float32)
    return vectors, qs


def same_neighbours(flat, queries, d_cpu, i_cpu, d_gpu, i_gpu, what: str) -> bool:
    """Distances close, and every id the GPU returns lies at the CPU's distance for its rank
    (recomputed in float64 from the vectors): where ids differ, only ties were ordered apart."""
    close = np.allclose(d_cpu, d_gpu, rtol=1e-4, atol=1e-3)
    true = ((queries[:, None, :].astype(np.float64) - flat[i_gpu].astype(np.float64)) ** 2).sum(-1)
    at_rank = np.allclose(true, d_cpu, rtol=1e-4, atol=1e-3)
    differ = int((i_cpu != i_gpu).sum())
    print(f"{what}: distances {'equal within 1e-4' if close else 'DIFFER'}; {differ} of {i_cpu.size} ids "
          f"differ, every GPU id {'at' if at_rank else 'NOT at'} the CPU distance of its rank")
    return close and at_rank


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--oracles", type=int, default=20)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--neighbours", type=int, default=20)
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 rather than skip without a GPU")
    args = ap.parse_args()

    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        print(f"SKIPPED FAISS GPU check: faiss {faiss.__version__} is a CPU-only build "
              f"(pip uninstall faiss-cpu; pip install 'dundi[gpu]')")
        return 2 if args.require_gpu else 0
    if faiss.get_num_gpus() < 1:
        print("SKIPPED FAISS GPU check: FAISS has GPU support but sees no GPU on this machine")
        return 2 if args.require_gpu else 0

    import torch

    from dundi.rule import search
    from dundi.rule.index import OracleIndex
    from dundi.rule.params import TwoStepRule
    from dundi.rule.reference import two_step_reference

    vectors, queries = data(args.classes, args.oracles, args.dim, args.queries)
    flat = vectors.reshape(-1, args.dim)
    res = search.gpu_resources()
    ok = True

    cpu = faiss.IndexFlatL2(args.dim)
    cpu.add(flat)
    t0 = time.perf_counter()
    gpu = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatL2(args.dim))
    gpu.add(flat)
    d_gpu, i_gpu = gpu.search(queries, args.neighbours)
    t_gpu = time.perf_counter() - t0
    t0 = time.perf_counter()
    d_cpu, i_cpu = cpu.search(queries, args.neighbours)
    t_cpu = time.perf_counter() - t0
    ok &= same_neighbours(flat, queries, d_cpu, i_cpu, d_gpu, i_gpu, f"flat L2, {len(flat)} vectors, built on the GPU")
    print(f"  build+search: GPU {t_gpu:.3f} s, CPU search {t_cpu:.3f} s")

    nlist = max(1, int(np.sqrt(len(flat))))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(args.dim), args.dim, nlist)
    ivf.train(flat)
    ivf.add(flat)
    ivf.nprobe = nlist
    d_cpu, i_cpu = ivf.search(queries, args.neighbours)
    ivf_gpu = faiss.index_cpu_to_gpu(res, 0, ivf)
    ivf_gpu.nprobe = nlist  # GPU IVF caps nprobe at 2048 (FAISS): nlist stays below it here
    d_gpu, i_gpu = ivf_gpu.search(queries, args.neighbours)
    ok &= same_neighbours(flat, queries, d_cpu, i_cpu, d_gpu, i_gpu, f"IVF-flat, {nlist} lists, all probed, on the GPU")

    rule = TwoStepRule(args.oracles, 3, 5)
    ref = two_step_reference(torch.from_numpy(queries[:500]), torch.from_numpy(vectors), rule).numpy()
    for name, index in (("exact distances", OracleIndex(flat, counts=[args.oracles] * args.classes, full_limit=0)),
                        ("step-1 shortlist (IVF)", OracleIndex(flat, counts=[args.oracles] * args.classes,
                                                               full_limit=0, exact_coarse_limit=0,
                                                               shortlist=args.classes, nprobe=2048))):
        got = index.classify(queries[:500], rule).labels
        agree = bool((got == ref).all())
        ok &= agree
        print(f"OracleIndex on the GPU, {name}: {int((got == ref).sum())} of {len(ref)} labels equal the "
              f"float64 reference ({'ok' if agree else 'MISMATCH'})")
    print("FAISS GPU check:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
