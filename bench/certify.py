"""Cost of a certificate per answer, relative to answering alone, in one run.

Paths on the same images and batches, alternating rounds so machine noise hits all alike;
for each path the median ms/image and the ratio of its median to the first path's median of
its group (with the range of the per-round ratios) are printed, with the torch thread count and
the machine's load:

- classify            the served path: batch-invariant float32 embedding + the float64 rule
- + certified@eps     one float32-aware interval pass + the two-step bounds
- + radius            the radius: a few interval passes (false position, docs/certification.md)

and with ``--run`` the served answer itself (``LoadedModel.predict``: embedding, rule, abstain
signals, certificate), as a Serve replica computes it:

- answer              a certified run served without certificates
- + certify_eps       the same with ``certify_eps`` (one interval pass per answer)
- + radius            the same with the full radius (the default)

An interval pass costs about two forward passes (centre and radius through every layer), so
no certificate of this kind can cost less than about 2x an answer; the bench says how far
from that it is. Without --run the cnn-ibp network keeps its initial weights (its radii are
near 0, which flatters the radius); with --run the images are the run's test split.

    python bench/certify.py [--run RUN] [--images 512] [--batch 256] [--rounds 3] [--eps 0.3] [--threads 1]

At one torch thread by default: how `dundi serve` and Serve replicas run (ServeSettings'
torch_threads), so the ratios are the served ones. Targets: certified@eps within 2.5x of
classify, the radius within 12x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import numpy as np
import torch

from dundi.nets.bounds import layers_of
from dundi.nets.models import build_distance_net
from dundi.robustness.certificate import Certifier
from dundi.rule.exact import embed_invariant
from dundi.rule.index import OracleIndex


def timed(paths: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def report(seconds: dict[str, list[float]], count: int) -> None:
    """One ratio per path, the ratio of the medians, so it follows from the ms column printed
    beside it (the median of per-round ratios parts from it on a loaded machine); the range of
    the per-round ratios is printed after it as the noise, labelled."""
    base = next(iter(seconds.values()))
    base_median = statistics.median(base)
    for name, times in seconds.items():
        ratios = [t / b for t, b in zip(times, base)]
        print(f"  {name:20} {1e3 * statistics.median(times) / count:8.3f} ms/image   "
              f"ratio of medians {statistics.median(times) / base_median:6.2f}x   "
              f"(per-round ratios {min(ratios):.2f}-{max(ratios):.2f}x)")


def served_paths(run_dir: str, images: np.ndarray, batch: int, eps: float) -> dict[str, Callable[[], object]]:
    """LoadedModel.predict without certificates, with certify_eps and with the full radius."""
    from dundi.serving.model import LoadedModel, ModelConfig

    full = LoadedModel(ModelConfig(run_dir))
    at_eps = LoadedModel(ModelConfig(run_dir, certify_eps=eps), run=full.run)
    plain = LoadedModel(ModelConfig(run_dir), run=full.run)
    plain.certifier = None  # the same run answered without certificates

    def each(model):
        return lambda: [model.predict(images[i:i + batch]) for i in range(0, len(images), batch)]

    return {"answer": each(plain), f"+ certify_eps {eps:g}": each(at_eps), "+ radius": each(full)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a certified run (default: untrained cnn-ibp)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: as served)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.run:
        from dundi.data import load_split
        from dundi.run.directory import Run

        run = Run.load(args.run)
        net, index = run.model, run.oracle
        images = load_split(run.meta["dataset"], "test", limit=args.images)[0]
    else:
        images = np.random.default_rng(0).random((args.images, 1, 28, 28), dtype=np.float32)
        torch.manual_seed(0)
        net = build_distance_net("cnn-ibp", (1, 28, 28)).eval()
        index = OracleIndex.from_embeddings(embed_invariant(layers_of(net), images[:200]),
                                            np.repeat(np.arange(10), 20), 10, metric="sqeuclidean")
    certifier = Certifier(net, index, index.resolve())
    layers = layers_of(net)

    def classify() -> np.ndarray:
        return np.concatenate([index.classify(embed_invariant(layers, images[i:i + args.batch])).labels
                               for i in range(0, len(images), args.batch)])

    def certified(**kw) -> Callable[[], object]:
        return lambda: certifier.batched(images, classify(), batch_size=args.batch, **kw)

    paths = {"classify": classify, f"+ certified@{args.eps:g}": certified(eps=[args.eps]),
             "+ radius": certified(radius=True)}
    print(f"{len(images)} images, batch {args.batch}, {args.rounds} rounds, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}")
    report(timed(paths, args.rounds), len(images))
    for name, kw in (("certified@eps", {"eps": [args.eps]}), ("radius", {"radius": True})):
        certifier.bounded = 0
        certified(**kw)()
        print(f"  interval passes per image, {name}: {certifier.bounded / len(images):.2f}")
    if args.run:
        print("served answers (LoadedModel.predict, as a Serve replica computes them):")
        report(timed(served_paths(args.run, images, args.batch, args.eps), args.rounds), len(images))
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
