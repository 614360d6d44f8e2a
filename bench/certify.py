"""Cost of a certificate per answer, relative to classifying alone (embed + two-step search).

Three paths on the same images, same batch, alternating rounds so machine noise hits all
alike; the median ratio to classify alone is printed:

- classify            the served path: batch-invariant float32 embedding + the float64 rule
- + certified@eps      one float32-aware interval pass (float64) + the two-step bounds
- + radius             the radius by bisection (1 + RADIUS_STEPS interval passes)

The certificate of an IBP-trained network is one interval pass (about two forward passes)
in float64, so it cannot reach the 1.1× a closed-form Lipschitz certificate would cost; the
bench says how far from it it is. Timing does not depend on the weights' values: without
--run the cnn-ibp network keeps its initial weights and indexes 20 embedded images per class.

    python bench/certify.py [--run RUN] [--images 2048] [--batch 256] [--rounds 5] [--eps 0.3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from dundi.bounds import layers_of
from dundi.certificate import Certifier
from dundi.exact_rule import embed_invariant
from dundi.inference import forward_batched
from dundi.models import build_distance_net
from dundi.oracle import OracleIndex


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a certified run (default: untrained cnn-ibp)")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--eps", type=float, default=0.3)
    args = ap.parse_args()
    images = np.random.default_rng(0).random((args.images, 1, 28, 28), dtype=np.float32)
    if args.run:
        from dundi.artifacts import Run

        run = Run.load(args.run)
        net, index = run.model, run.oracle
    else:
        torch.manual_seed(0)
        net = build_distance_net("cnn-ibp", (1, 28, 28)).eval()
        index = OracleIndex.from_embeddings(forward_batched(net, images[:200]), np.repeat(np.arange(10), 20),
                                            10, metric="sqeuclidean")
    oracles = torch.from_numpy(index.blocks.copy())
    certifier = Certifier(net, oracles, index.n, min(3, index.n), 5)
    layers = layers_of(net)

    def classify() -> np.ndarray:
        return np.concatenate([index.classify(embed_invariant(layers, images[i:i + args.batch]), m=3, k=5).labels
                               for i in range(0, len(images), args.batch)])

    def with_certificate() -> None:
        labels = classify()
        certifier.batched(images, labels, eps=[args.eps], batch_size=args.batch)

    def with_radius() -> None:
        labels = classify()
        certifier.batched(images, labels, radius=True, batch_size=args.batch)

    paths = {"classify": classify, f"+ certified@{args.eps:g}": with_certificate, "+ radius": with_radius}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    passes = {}
    for name, fn in (("certified@eps", lambda: certifier.batched(images, classify(), eps=[args.eps])),
                     ("radius", lambda: certifier.batched(images, classify(), radius=True))):
        certifier.bounded = 0
        fn()
        passes[name] = certifier.bounded / len(images)
    base = seconds["classify"]
    print(f"{args.images} images, batch {args.batch}, {args.rounds} rounds, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}")
    print("  interval passes per image: " + ", ".join(f"{k} {v:.2f}" for k, v in passes.items()))
    for name, times in seconds.items():
        ratios = [t / b for t, b in zip(times, base)]
        print(f"  {name:20} {1e3 * statistics.median(times) / args.images:8.3f} ms/image   "
              f"ratio to classify {statistics.median(ratios):6.2f}x")


if __name__ == "__main__":
    main()
