"""DunDi classification throughput (embed + two-step search) over the native model's forward
throughput, same backbone, same batch, same images. Target: ratio ≥ 0.9.

Throughput does not depend on the weights' values, so both models keep their initial
weights; the oracle index holds 20 embedded images per class (10 classes).
Rounds alternate native / DunDi so machine noise hits both alike; the median ratio is printed.

    python bench/classify_overhead.py [--arch lenet5] [--batch 256] [--images 8192] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dundi.nets.inference import forward_batched
from dundi.nets.models import build_distance_net, build_native
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="lenet5")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    shape = (3, 32, 32) if args.arch == "vgg16" else (1, 28, 28)
    torch.manual_seed(0)
    native = build_native(args.arch, shape, 10).eval()
    dundi = build_distance_net(args.arch, shape).eval()
    images = np.random.default_rng(0).random((args.images, *shape), dtype=np.float32)
    labels = np.repeat(np.arange(10), 20)
    index = OracleIndex.from_embeddings(forward_batched(dundi, images[:200]), labels, 10)

    def run_native() -> None:
        forward_batched(native, images, args.batch).argmax(1)

    def run_dundi() -> None:
        index.classify(forward_batched(dundi, images, args.batch), TwoStepRule(20, 3, 5))

    run_native(), run_dundi()  # warm-up
    rates: dict[str, list[float]] = {"native": [], "dundi": []}
    for _ in range(args.rounds):
        for name, fn in (("native", run_native), ("dundi", run_dundi)):
            t0 = time.perf_counter()
            fn()
            rates[name].append(args.images / (time.perf_counter() - t0))
    ratios = [d / n for d, n in zip(rates["dundi"], rates["native"])]
    print(f"{args.arch}, batch {args.batch}, {args.images} images, {torch.get_num_threads()} threads, "
          f"{args.rounds} alternating rounds")
    print(f"native forward + argmax : {statistics.median(rates['native']):9.0f} images/s (median)")
    print(f"DunDi embed + two-step  : {statistics.median(rates['dundi']):9.0f} images/s (median)")
    print(f"ratio DunDi / native    : {statistics.median(ratios):.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
