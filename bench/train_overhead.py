"""Triplet-training throughput (tuples/s): the local loop against Ray Train with 1 and with 2
workers, and the paper's loop (three forward passes per tuple) against embedding each distinct
image of a batch once. Same data (mnist-10k training split), model, seed and tuple count.

Targets: Ray Train with 1 worker within 10% of the local loop; the deduplicated loop at least
2x the paper's. Deduplication can only save the forward passes of images that repeat within a
batch: with random tuples over thousands of images almost none do (the bench prints how many
distinct images a batch holds), so expect ~1x there; ``--pool 500 --batch 512 --skip-ray``
shows the regime where it pays (a small image pool, large batches). Two-worker scaling is reported as measured: on a 2-core machine two workers
share the cores that one worker plus Ray's own processes already use.

"In-loop" rates time the epochs only (inside the worker for Ray, measured the same way for
the local loop); Ray's fixed start-up cost (starting Ray, the controller, the workers and
their process group) is reported separately, since it does not grow with the run. A Ray
worker holds 1 CPU and so runs torch with 1 thread: the local loop is timed with 1 thread
too (like for like) and, for context, with torch's default thread count.

    python bench/train_overhead.py [--arch lenet5] [--tuples 6000] [--epochs 3] [--batch 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from dundi.data import load_split
from dundi.run.pipeline import new_distance_net
from dundi.training.config import TrainConfig
from dundi.training.passes import (
    epoch_tuples,
    make_optimizer,
    make_tuples,
    run_triplet_epoch,
    split_train_val,
    triplet_batch_loss,
)


class LocalLoop:
    """The local loop (run_triplet_epoch, as fit() runs it), one epoch per call to ``epoch``."""

    def __init__(self, cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, threads: int):
        self.cfg, self.threads, self.done = cfg, threads, 0
        self.model, _ = new_distance_net(cfg, None)
        self.opt = make_optimizer(self.model, cfg)
        self.x, self.y = torch.as_tensor(images), torch.as_tensor(labels)
        self.tuples = make_tuples(labels, cfg)
        self.rates: list[float] = []

    def epoch(self) -> None:
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            t0 = time.perf_counter()
            run_triplet_epoch(self.model, self.opt, self.x, self.y,
                              epoch_tuples(self.tuples, self.done, self.cfg.seed), self.cfg, progress=False)
            self.rates.append(len(self.tuples) / (time.perf_counter() - t0))
            self.done += 1
        finally:
            torch.set_num_threads(old)


def ray_run(cfg: TrainConfig, workers: int, root: str) -> dict:
    from dundi.distributed.train_job import RayOptions, run_ray_training

    out = f"{root}/ray{workers}"
    t0 = time.perf_counter()
    meta = run_ray_training("dundi", cfg, out, RayOptions(workers=workers, oracles=10, progress=False),
                            log_fn=lambda s: None)
    wall = time.perf_counter() - t0
    seconds = meta["ray"]["epoch_seconds"]
    # The run holds cfg.tuples tuples per epoch in all (cfg.tuples // workers per worker).
    per_epoch = (cfg.tuples // workers) * workers
    return {"rates": [per_epoch / s for s in seconds], "wall": wall, "fixed": wall - sum(seconds)}


def same_loss(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray) -> float:
    """Largest |loss difference| between the two loops over the first batches of an epoch."""
    model, _ = new_distance_net(cfg, None)
    x, y = torch.as_tensor(images), torch.as_tensor(labels)
    tuples = epoch_tuples(make_tuples(labels, cfg), 0, cfg.seed)
    worst = 0.0
    with torch.no_grad():
        for start in range(0, min(len(tuples), 8 * cfg.batch_size), cfg.batch_size):
            batch = tuples[start:start + cfg.batch_size]
            a, _ = triplet_batch_loss(model, x, y, batch, dataclasses.replace(cfg, dedupe=True))
            b, _ = triplet_batch_loss(model, x, y, batch, dataclasses.replace(cfg, dedupe=False))
            worst = max(worst, abs(a.item() - b.item()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="lenet5")
    ap.add_argument("--tuples", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="alternating epochs of each local variant")
    ap.add_argument("--pool", type=int, default=None,
                    help="train on only this many images (balanced): many repeats per batch")
    ap.add_argument("--skip-ray", action="store_true", help="only the local loops")
    args = ap.parse_args()
    cfg = TrainConfig("mnist-10k", args.arch, epochs=args.epochs, tuples=args.tuples,
                      batch_size=args.batch, seed=0)
    images, labels, _ = load_split(cfg.dataset, "train")
    tr, _ = split_train_val(labels, cfg.val_fraction, cfg.seed)
    if args.pool:  # a small balanced pool of images: the regime where deduplication pays
        per_class = args.pool // (labels.max() + 1)
        tr = np.sort(np.concatenate([tr[labels[tr] == c][:per_class] for c in np.unique(labels[tr])]))
    x_tr, y_tr = images[tr], labels[tr]
    default_threads = torch.get_num_threads()
    med = statistics.median
    print(f"{args.arch}, mnist-10k train split ({len(tr)} images{', balanced pool' if args.pool else ''}), {args.tuples} tuples x "
          f"{args.epochs} epochs, batch {args.batch}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    loops = {"local1": LocalLoop(cfg, x_tr, y_tr, 1),
             "paper1": LocalLoop(dataclasses.replace(cfg, dedupe=False), x_tr, y_tr, 1),
             "localn": LocalLoop(cfg, x_tr, y_tr, default_threads)}

    def local_rounds(n: int) -> None:  # alternate, so machine noise hits every variant alike
        for _ in range(n):
            for loop in loops.values():
                loop.epoch()

    local_rounds(args.rounds)
    if not args.skip_ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory(prefix="bench-train-") as root:
            r1 = ray_run(cfg, 1, root)
            local_rounds(1)
            r2 = ray_run(cfg, 2, root)
        ray.shutdown()
        local_rounds(1)
    rate = {name: med(loop.rates) for name, loop in loops.items()}
    # How much deduplication can save: distinct images per batch against 3 per tuple.
    sample = epoch_tuples(loops["local1"].tuples, 0, cfg.seed)[: 20 * cfg.batch_size]
    distinct = statistics.mean(len(np.unique(sample[i:i + cfg.batch_size]))
                               for i in range(0, len(sample), cfg.batch_size))
    print(f"local loop, 1 thread                : {rate['local1']:8.0f} tuples/s (median epoch)")
    print(f"local loop, {default_threads} threads               : {rate['localn']:8.0f} tuples/s")
    print(f"paper's loop (3 passes), 1 thread   : {rate['paper1']:8.0f} tuples/s")
    print(f"dedupe / paper's loop               : {rate['local1'] / rate['paper1']:8.2f}x (target >= 2x); "
          f"{distinct:.0f} distinct images per batch of {cfg.batch_size} tuples "
          f"(the paper's loop embeds {3 * cfg.batch_size}); max |loss difference| "
          f"{same_loss(cfg, x_tr, y_tr):.2e}")
    if args.skip_ray:
        return
    print(f"Ray Train, 1 worker (1 CPU), in-loop: {med(r1['rates']):8.0f} tuples/s  "
          f"-> overhead vs local 1-thread loop {100 * (1 - med(r1['rates']) / rate['local1']):+.1f}% "
          f"(target <= 10%)")
    print(f"Ray Train, 2 workers (DDP), in-loop : {med(r2['rates']):8.0f} tuples/s  "
          f"-> {med(r2['rates']) / med(r1['rates']):.2f}x one worker, "
          f"{med(r2['rates']) / rate['localn']:.2f}x the local {default_threads}-thread loop")
    print(f"Ray fixed start-up per run          : {r1['fixed']:.1f} s (1 worker), {r2['fixed']:.1f} s "
          f"(2 workers); whole runs {r1['wall']:.1f} s / {r2['wall']:.1f} s")
    end_to_end = args.tuples * args.epochs / r1["wall"]
    print(f"Ray Train, 1 worker, end to end     : {end_to_end:8.0f} tuples/s for this "
          f"{args.epochs}-epoch run = {end_to_end / rate['local1']:.2f}x the local loop "
          f"(the fixed start-up dominates short runs)")


if __name__ == "__main__":
    main()
