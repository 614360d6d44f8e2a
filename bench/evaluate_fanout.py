"""Adversarial evaluation fanned out as Ray tasks over W workers vs the same evaluation in one
process: same runs, same shards, same rows.

One process: :func:`dundi.evaluate.evaluate_local`, with one torch thread (its default) and
with torch's default thread count. Ray: :func:`dundi.distributed.evaluate_job.evaluate_on_ray` with
``--workers`` tasks of one CPU (one torch thread) each, on a local Ray started once (its
start-up is timed separately; the speed-up is printed with and without it), whose workers
run at the driver's priority (:data:`~dundi.distributed.evaluate_job.LOCAL_RAY_CONFIG`; Ray's
default niceness of 15 starves them on a shared machine). Every round
writes every shard into empty directories, the three variants alternate so machine noise hits
them alike, and medians are printed. The rows of all variants are compared at the end: they
must be identical (attacks are seeded per shard).

Each variant pays its own warm-up (model loading, torch's first forward pass): the one
process once, every Ray worker process once per round (Ray reuses worker processes, but
each round starts with a new evaluation directory and hence new per-process state).

The default workload is a real one (minutes of work, where start-up and warm-up no longer
dominate): 1,024 samples × PGD-100 on the adaptive threat model (DunDi's exact two-step
stand-in), 16 shards of 64. ``--attacks autoattack`` measures the AutoAttack cascade.
Without --run/--native a small native LeNet-5 and DunDi_R run are trained first (≈1 min).
The load average is printed: on a shared 2-core machine other work skews every figure.
``--no-threads-variant`` skips the one-process run with torch's default thread count.

    python bench/evaluate_fanout.py [--run R --native N] [--workers 2] [--limit 1024]
        [--attacks pgd] [--threats adaptive] [--steps 100] [--shard-size 64] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def train_runs(root: Path) -> tuple[str, str]:
    from dundi.pipeline import build_index, train_dundi_run, train_native_run
    from dundi.train import TrainConfig

    native = TrainConfig("mnist-10k", "lenet5", epochs=2, limit=3000)
    dundi = TrainConfig("mnist-10k", "lenet5", epochs=2, limit=3000, tuples=6000)
    train_native_run(native, root / "native", progress=False, log=lambda s: None)
    train_dundi_run(dundi, root / "dundi", progress=False, log=lambda s: None)
    build_index(root / "dundi", n=10, seed=0)
    return str(root / "dundi"), str(root / "native")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None)
    ap.add_argument("--native", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=1024)
    ap.add_argument("--attacks", nargs="+", default=["pgd"])
    ap.add_argument("--threats", nargs="+", default=["adaptive"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-threads-variant", action="store_true",
                    help="skip the one-process variant with torch's default thread count")
    args = ap.parse_args()

    import ray
    import torch

    from dundi.distributed.evaluate_job import LOCAL_RAY_CONFIG, evaluate_on_ray
    from dundi.distributed.ray_init import init_ray
    from dundi.evaluate import EvalConfig, evaluate_local
    from dundi.results import read_results

    tmp = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    run, native = (args.run, args.native) if args.run else train_runs(tmp / "runs")
    cfg = EvalConfig(run=run, native=native, attacks=args.attacks, threats=args.threats,
                     steps=args.steps, limit=args.limit, shard_size=args.shard_size)
    threads = torch.get_num_threads()
    quiet = lambda s: None  # noqa: E731

    def local(out: Path, n_threads: int) -> None:
        evaluate_local(cfg, out, progress=False, log=quiet, threads=n_threads)

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    init_ray(None, num_cpus=args.workers, log_to_driver=False, _system_config=LOCAL_RAY_CONFIG)
    t_init = time.perf_counter() - t0
    variants = {} if args.no_threads_variant else {
        f"one process, {threads} torch threads": lambda out: local(out, threads)}
    variants |= {
        "one process, 1 torch thread": lambda out: local(out, 1),
        f"Ray, {args.workers} workers x 1 thread": lambda out: evaluate_on_ray(
            cfg, out, workers=args.workers, progress=False, log=quiet),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for i, (name, fn) in enumerate(variants.items()):
            t0 = time.perf_counter()
            fn(tmp / f"round{r}-{i}")
            times[name].append(time.perf_counter() - t0)
    ray.shutdown()
    load1 = os.getloadavg()

    key = lambda row: (row["threat"], row["attack"], row["eps"], row["sample_id"])  # noqa: E731
    tables = [sorted(read_results(tmp / f"round0-{i}", require_complete=True).to_pylist(), key=key)
              for i in range(len(variants))]
    identical = all(t == tables[0] for t in tables[1:])

    shards = len(args.attacks) * len(args.threats) * -(-args.limit // args.shard_size)
    print(f"{len(tables[0])} rows: {len(args.attacks)} attacks ({', '.join(args.attacks)}) x "
          f"{len(args.threats)} threat models x {args.limit} samples, steps {args.steps}, "
          f"{shards} shards of {args.shard_size}; {args.rounds} alternating rounds")
    print(f"cores {os.cpu_count()}, load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    for name, ts in times.items():
        print(f"{name:32s}: median {statistics.median(ts):7.2f} s  (rounds: "
              f"{', '.join(f'{t:.2f}' for t in ts)})")
    print(f"{'Ray start-up (local)':32s}: {t_init:7.2f} s (once)")
    names = list(variants)
    best_local = min(statistics.median(times[name]) for name in names[:-1])
    ray_t = statistics.median(times[names[-1]])
    print(f"speed-up, best one-process / Ray : {best_local / ray_t:.2f}x without Ray start-up, "
          f"{best_local / (ray_t + t_init):.2f}x with it")
    print(f"rows identical across variants   : {identical}")


if __name__ == "__main__":
    main()
