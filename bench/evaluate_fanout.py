"""Adversarial evaluation on W Ray worker actors vs the same evaluation in one process:
same runs, same shards, same rows; the speed-up printed as a ratio, Ray's start-up included.

One process: :func:`dundi.evaluation.evaluate.evaluate_local` with one shard at a time and with one
shard per core at once (threads of the process, one torch thread each: the rows are the same bits
only at one torch thread, so intra-op threads are no longer a layout). Ray: :func:`dundi.distributed.evaluate_job.evaluate_on_ray`
with ``--workers`` actors of one CPU (one torch thread) each; every Ray round starts a local
Ray, starts the actors, evaluates and stops Ray again, and all of that is on its clock. Ray's
workers run at the driver's priority (:data:`~dundi.distributed.evaluate_job.LOCAL_RAY_CONFIG`).
Every round writes every shard into empty directories, the variants alternate so machine
noise hits them alike, and medians are printed. The rows of all variants are compared at the
end: they must be identical (attacks are seeded per shard).

Ray is run twice: as `dundi evaluate` runs it (Ray and the bare actors started in a thread
while the driver plans and loads the runs and samples) and with Ray started only after the
loading, the way it was before; the time from the call to the first shard is printed for both.

Beside the wall-clock ratio it prints what explains it, from the workers' own clocks: how long
the actors' shard intervals overlapped (2 workers on 2 free cores: close to the whole run),
the CPU seconds per shard on the workers and in the one process (equal when nothing but
the start-up is lost), and the load average before and after (other work on a shared
machine takes cores from both sides).

The default workload is the real one: the AutoAttack cascade (``--attacks autoattack``,
100 iterations, Square 5,000 queries) on the adaptive threat model (DunDi's exact two-step
stand-in) at eps 0.3. Give it a DunDi-AT run (``--run``, ``--native``), on which the cascade
runs to its end; without them a small plain native LeNet-5 and DunDi_R run are trained
first (≈1 min), which most attacks fool at once: use ``--attacks pgd --eps 0.1`` there.

    python bench/evaluate_fanout.py [--run R --native N] [--workers 2] [--limit 256]
        [--attacks autoattack] [--threats adaptive] [--eps 0.3] [--steps 100]
        [--shard-size 16] [--rounds 1] [--no-threads-variant]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


RAY = "Ray, asked for (actors x 1 thread)"
RAY_SEQ = "Ray, start-up after loading"
AUTO = "auto: `dundi evaluate`'s default"


def train_runs(root: Path) -> tuple[str, str]:
    from dundi.run.pipeline import build_index, train_dundi_run, train_native_run
    from dundi.training.config import TrainConfig

    native = TrainConfig("mnist-10k", "lenet5", epochs=2, limit=3000)
    dundi = TrainConfig("mnist-10k", "lenet5", epochs=2, limit=3000, tuples=6000)
    train_native_run(native, root / "native", progress=False, log=lambda s: None)
    train_dundi_run(dundi, root / "dundi", progress=False, log=lambda s: None)
    build_index(root / "dundi", n=10, seed=0)
    return str(root / "dundi"), str(root / "native")


def print_figures(args, times: dict[str, list[float]], figures: dict, rows: int, identical: bool,
                  load0: tuple, load1: tuple) -> None:
    """The medians, the speed-up with Ray's start-up included, and what explains it (the
    workers' own clocks: start-up, overlap, CPU seconds per shard)."""
    from dundi.distributed.evaluate_job import busy_overlap

    shards = len(args.attacks) * len(args.threats) * len(args.eps) * -(-args.limit // args.shard_size)
    print(f"{rows} rows: {', '.join(args.attacks)} x {', '.join(args.threats)} x eps "
          f"{', '.join(f'{e:g}' for e in args.eps)} x {args.limit} samples, steps {args.steps}, "
          f"{shards} shards of {args.shard_size}; {args.rounds} alternating rounds")
    print(f"cores {os.cpu_count()}, load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    for name, ts in times.items():
        print(f"{name:32s}: median {statistics.median(ts):7.2f} s  (rounds: "
              f"{', '.join(f'{t:.2f}' for t in ts)})")
    local_names = [name for name in times if name.startswith("one process")]
    best_local = min(statistics.median(times[name]) for name in local_names)
    ray_t = statistics.median(times[RAY])
    auto_t = statistics.median(times[AUTO])
    print(f"speed-up, best one-process / auto: {best_local / auto_t:.2f}x, the default layout "
          f"({figures['auto']['layout']}: {figures['auto']['layout_reason']}) (target >= 1.0x)")
    print(f"speed-up, best one-process / Ray : {best_local / ray_t:.2f}x, Ray's start-up included "
          f"(Ray asked for, --workers {args.workers})")
    tasks = figures["ray"]["tasks"]
    span = max(t["end"] for t in tasks) - min(t["start"] for t in tasks)
    print(f"Ray: first shard starts {ray_t - span:.2f} s after the call (start-up), shards span "
          f"{span:.2f} s, two or more workers busy for {busy_overlap(tasks):.2f} s of it; "
          f"worker niceness {sorted({t['niceness'] for t in tasks})}")
    if "ray_seq" in figures:  # time to first shard: start-up overlapped with loading vs after it
        first = {key: min(t["start"] for t in figures[key]["tasks"]) - figures[key]["called"]
                 for key in ("ray", "ray_seq")}
        print(f"time to first shard on Ray: {first['ray_seq']:.2f} s with Ray started after loading "
              f"(before), {first['ray']:.2f} s with the start-up overlapped (after): "
              f"{first['ray_seq'] / first['ray']:.2f}x (last round of each)")
    print(f"CPU seconds per shard: Ray workers {figures['ray']['cpu_seconds'] / len(tasks):.2f}, one process "
          f"(1 thread, its last round, loading included) {figures['local1']['cpu'] / shards:.2f}")
    print(f"rows identical across variants   : {identical}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None)
    ap.add_argument("--native", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--attacks", nargs="+", default=["autoattack"])
    ap.add_argument("--threats", nargs="+", default=["adaptive"])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.3])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-threads-variant", action="store_true",
                    help="skip the one-process variant with one shard thread per core")
    args = ap.parse_args()

    import torch

    from dundi.distributed.evaluate_job import evaluate_auto, evaluate_on_ray
    from dundi.evaluation.config import EvalConfig
    from dundi.evaluation.evaluate import evaluate_local
    from dundi.evaluation.results import read_results

    tmp = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    run, native = (args.run, args.native) if args.run else train_runs(tmp / "runs")
    cfg = EvalConfig(run=run, native=native, attacks=args.attacks, threats=args.threats, eps=args.eps,
                     steps=args.steps, limit=args.limit, shard_size=args.shard_size)
    threads = torch.get_num_threads()
    quiet = lambda s: None  # noqa: E731
    figures: dict[str, dict] = {}

    def local(out: Path, n_threads: int) -> None:
        c0 = time.process_time()
        evaluate_local(cfg, out, progress=False, log=quiet, threads=n_threads)
        figures.setdefault(f"local{n_threads}", {})["cpu"] = time.process_time() - c0

    def on_ray(out: Path, key: str = "ray", overlap: bool = True) -> None:
        called = time.time()
        figures[key] = evaluate_on_ray(cfg, out, workers=args.workers, progress=False, log=quiet,
                                       overlap_startup=overlap)
        figures[key]["called"] = called

    def auto(out: Path) -> None:
        figures["auto"] = evaluate_auto(cfg, out, progress=False, log=quiet)

    load0 = os.getloadavg()
    variants = {} if args.no_threads_variant or threads == 1 else {
        f"one process, {threads} shard threads": lambda out: local(out, threads)}
    variants |= {"one process, 1 shard thread": lambda out: local(out, 1), RAY: on_ray,
                 RAY_SEQ: lambda out: on_ray(out, "ray_seq", overlap=False), AUTO: auto}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for i, (name, fn) in enumerate(variants.items()):
            t0 = time.perf_counter()
            fn(tmp / f"round{r}-{i}")
            times[name].append(time.perf_counter() - t0)
    load1 = os.getloadavg()

    key = lambda row: (row["threat"], row["attack"], row["eps"], row["sample_id"])  # noqa: E731
    tables = [sorted(read_results(tmp / f"round0-{i}", require_complete=True).to_pylist(), key=key)
              for i in range(len(variants))]
    identical = all(t == tables[0] for t in tables[1:])

    print_figures(args, times, figures, len(tables[0]), identical, load0, load1)


if __name__ == "__main__":
    main()
