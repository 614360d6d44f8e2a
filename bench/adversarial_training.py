"""Cost of adversarial training per adversarial example: DunDi-AT (a PGD anchor per tuple, plus
the clean triplet pass) against Madry-style training of the native model (a PGD example per
image, plus the clean pass), same architecture, PGD budget and steps, one process, alternating
rounds so both see the same machine load.

It prints adversarial examples per second for each and their ratio, and, from the rates, the
cost of the two training runs in docs/results/ (Madry: 40 epochs x 7,200 images; DunDi-AT:
6 epochs x 30K or 60K tuples) in units of one Madry epoch.

    python bench/adversarial_training.py [--arch lenet5] [--examples 2048] [--steps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dundi.data import load_split
from dundi.run.pipeline import new_distance_net, new_native_net
from dundi.training.config import TrainConfig
from dundi.training.passes import make_optimizer, make_tuples, run_native_epoch, run_triplet_epoch


def rate(run, examples: int) -> float:
    start = time.perf_counter()
    run()
    return examples / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="lenet5")
    ap.add_argument("--examples", type=int, default=2048, help="adversarial examples per round")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    images, labels, _ = load_split("mnist-10k", "train")
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    common = dict(dataset="mnist-10k", arch=args.arch, adversarial=True, adv_eps=0.3,
                  adv_steps=args.steps, seed=0)
    madry_cfg = TrainConfig(**common, adv_mix=1.0)
    at_cfg = TrainConfig(**common, adv_mix=0.5, tuples=args.examples)
    native, (dundi, _) = new_native_net(madry_cfg), new_distance_net(at_cfg, None)
    native_opt, dundi_opt = make_optimizer(native, madry_cfg), make_optimizer(dundi, at_cfg)
    order = np.random.default_rng(0).permutation(len(y))[: args.examples]
    tuples = make_tuples(labels, at_cfg)

    madry_rates, at_rates = [], []
    for _ in range(args.rounds):
        madry_rates.append(rate(lambda: run_native_epoch(native, native_opt, x, y, order, madry_cfg, False),
                                args.examples))
        at_rates.append(rate(lambda: run_triplet_epoch(dundi, dundi_opt, x, y, tuples, at_cfg, False),
                             args.examples))
    madry, at = statistics.median(madry_rates), statistics.median(at_rates)
    print(f"{args.arch}, PGD eps 0.3 x {args.steps} steps, {args.examples} adversarial examples per round, "
          f"{args.threads} thread(s), median of {args.rounds} rounds")
    print(f"  Madry-style native training : {madry:8.1f} adversarial images/s")
    print(f"  DunDi-AT triplet training   : {at:8.1f} adversarial anchors/s")
    print(f"  ratio DunDi-AT / Madry (per adversarial example): {at / madry:.2f}")
    madry_epoch = 7200 / madry
    for name, count in (("Madry-AT, 40 epochs x 7,200 images", 40 * 7200),
                        ("DunDi-AT AT5, 6 epochs x 30K tuples", 6 * 30_000),
                        ("DunDi-AT AT5-long, 6 epochs x 60K tuples", 6 * 60_000)):
        seconds = count / (madry if name.startswith("Madry") else at)
        print(f"  {name:42s}: {seconds:7.0f} s at these rates = {seconds / madry_epoch:5.1f} Madry epochs")


if __name__ == "__main__":
    main()
