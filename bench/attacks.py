"""Adversarial examples per second: dundi.attacks over torchattacks 3.5.1, same LeNet-5,
same images, one process. Targets: JSMA >= 20x, DeepFool >= 3x; FGSM/BIM/PGD ~1x (both
are batched; ours must simply not be slower). Last, the AutoAttack cascade (APGD-CE, APGD-T,
FAB-T, Square 5,000 queries) against torchattacks' ``AutoAttack(version="standard")`` on the
same model and images: speed ratio and robust accuracy (targets: >= 1x, ours <= theirs + 1 pt).
``--aa-only`` runs just that; ``--native-run DIR`` attacks a trained native run (e.g. the
Madry-style model) instead of the bench's own LeNet-5.

A LeNet-5 (DeepXplore's Model3, defined here) is trained for a few seconds on synthetic
10-class 28x28 images (noisy, shifted blocky prototypes), or on real MNIST digits with
``--dataset mnist-10k`` (needs the dundi data cache). torchattacks attacks JSMA and
DeepFool one image at a time, so it gets a small slice of the batch (``--slow-batch``);
rates are images/s either way. Rounds alternate ours / theirs so machine noise hits both
alike; the best round of each is kept. Success rates are printed beside the speeds to
show both sides did the same job.

    python bench/attacks.py [--batch 128] [--slow-batch 8] [--rounds 3] [--threads 1] [--dataset synthetic]
        [--aa-eps 0.1] [--aa-batch 128] [--aa-only] [--native-run DIR]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dundi.attacks import BIMB, FGSM, JSMA, PGD, AutoAttack, DeepFool, Square


def load_torchattacks():
    """torchattacks 3.5.1 (installed with --no-deps by `make setup`): the reference."""
    try:
        import torchattacks
    except ModuleNotFoundError:
        sys.exit("torchattacks is not installed: pip install --no-deps torchattacks==3.5.1 scipy")
    return torchattacks


def lenet5() -> nn.Module:
    """DeepXplore's LeNet-5 (the paper's MNIST Model3): logits out."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 7 * 7, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    protos = (np.random.default_rng(1234).random((10, 7, 7)) < 0.3).astype(np.float32).repeat(4, 1).repeat(4, 2)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = np.stack([np.roll(protos[c], tuple(s), (0, 1)) for c, s in zip(y, rng.integers(-2, 3, (n, 2)))])
    x = x * rng.uniform(0.6, 1.0, (n, 1, 1)) + rng.normal(0, 0.15, x.shape)
    return torch.from_numpy(np.clip(x, 0, 1).astype(np.float32)[:, None]), torch.from_numpy(y)


def data(name: str, n_train: int, n_test: int):
    if name == "synthetic":
        return synthetic(n_train, 0), synthetic(n_test, 1)
    from dundi.data import load_split

    xtr, ytr, _ = load_split(name, "train", limit=n_train)
    xte, yte, _ = load_split(name, "test", limit=n_test)
    return ((torch.as_tensor(xtr), torch.as_tensor(ytr)), (torch.as_tensor(xte), torch.as_tensor(yte)))


def train(x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    net = lenet5()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def timed(fn, images, labels) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    adv = fn(images, labels)
    return len(images) / (time.perf_counter() - t0), adv


def autoattack_row(ta, net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    """Our cascade vs torchattacks' standard AutoAttack: one run each (minutes), same images.

    torchattacks' AutoAttack(version="standard") builds APGD, APGD-T and FAB with their
    constructors' default of 10 iterations (the original AutoAttack runs 100) and Square with
    5,000 queries. Our cascade runs once with those settings (like for like) and once with the
    original's 100 iterations, which is what `dundi evaluate --attacks autoattack` uses."""
    def robust(adv):
        with torch.no_grad():
            return (net(adv).argmax(1) == y).float().mean().item()

    with torch.random.fork_rng():
        r_t, adv_t = timed(ta.AutoAttack(net, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0),
                           x, y)
    ra_t = robust(adv_t)
    assert (adv_t - x).abs().max() <= eps + 1e-5
    for steps, what in ((10, "10 it, as theirs"), (100, "100 it, original")):
        r_o, adv_o = timed(AutoAttack(net, eps=eps, steps=steps, n_queries=5000, seed=0), x, y)
        ra_o = robust(adv_o)
        assert (adv_o - x).abs().max() <= eps + 1e-6
        print(f"{f'AutoAttack {what}':26s} {r_o:11.2f} {r_t:13.2f} {r_o / r_t:7.2f}x   robust accuracy "
              f"ours {ra_o:.2%} / theirs {ra_t:.2%} ({100 * (ra_o - ra_t):+.1f} pt) on {len(x)} images, eps {eps:g}",
              flush=True)
    print("AutoAttack targets: speed >= 1x like for like, robust accuracy <= theirs + 1 pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128, help="images for the batched attacks")
    ap.add_argument("--slow-batch", type=int, default=8, help="images for torchattacks' JSMA and DeepFool")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds for the fast attacks")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine two threads per "
                         "process oversubscribe the cores and both libraries slow down many times over)")
    ap.add_argument("--dataset", default="synthetic", help="'synthetic' or a dundi dataset, e.g. mnist-10k")
    ap.add_argument("--aa-eps", type=float, default=0.1,
                    help="AutoAttack's Linf budget (0.1 leaves the bench's plain LeNet-5 partly robust, so "
                         "every component of the cascade runs; use 0.3 with a Madry-style --native-run)")
    ap.add_argument("--aa-batch", type=int, default=128, help="images for the AutoAttack comparison")
    ap.add_argument("--aa-only", action="store_true", help="only the AutoAttack comparison")
    ap.add_argument("--native-run", default=None, help="attack this native run's model (needs --dataset)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ta = load_torchattacks()

    t0 = time.perf_counter()
    (xtr, ytr), (xte, yte) = data(args.dataset, 3000, 2 * max(args.batch, args.aa_batch))
    if args.native_run:
        from dundi.artifacts import Run

        net = Run.load(args.native_run, with_oracle=False).model.eval()
    else:
        net = train(xtr, ytr, epochs=1 if args.dataset == "synthetic" else 3)
    with torch.no_grad():
        ok = net(xte).argmax(1) == yte
    clean_acc = ok.float().mean().item()
    x, y = xte[ok][: args.batch], yte[ok][: args.batch]  # correctly classified: success = label flipped
    xs, ys = x[: args.slow_batch], y[: args.slow_batch]
    if args.aa_only:
        print(f"{'attack':26s} {'ours img/s':>11s} {'theirs img/s':>13s} {'ratio':>7s}")
        autoattack_row(ta, net, xte[ok][: args.aa_batch], yte[ok][: args.aa_batch], args.aa_eps)
        return
    target = (y + 1 + torch.randint(0, 9, y.shape, generator=torch.Generator().manual_seed(0))) % 10
    print(f"LeNet-5 on {args.dataset}: trained in {time.perf_counter() - t0:.1f} s, clean accuracy "
          f"{clean_acc:.3f}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"batch {len(x)} correctly classified test images; torchattacks JSMA/DeepFool on the first "
          f"{len(xs)}\n")

    def fooled(adv, labels, tgt=None):
        with torch.no_grad():
            pred = net(adv).argmax(1)
        return (pred == tgt).float().mean().item() if tgt is not None else (pred != labels).float().mean().item()

    def jsma_theirs(images, labels):
        atk = ta.JSMA(net, theta=1.0, gamma=0.1)
        atk.set_mode_targeted_by_label(quiet=True)
        return atk(images, target[: len(images)])

    def square_theirs(images, labels):
        with torch.random.fork_rng():  # torchattacks' Square reseeds the global RNG
            return ta.Square(net, eps=0.3, n_queries=1000, seed=0)(images, labels)

    # (row, ours, theirs, batch for ours, batch for theirs, rounds, targeted)
    rows = [
        ("FGSM eps 0.3", FGSM(net, eps=0.3), ta.FGSM(net, eps=0.3), "fast", "fast", args.rounds, False),
        ("BIM-B 50 (iFGSM-b)", BIMB(net, eps=0.3, alpha=0.01, steps=50), ta.BIM(net, eps=0.3, alpha=0.01, steps=50),
         "fast", "fast", args.rounds, False),
        ("PGD-50 Linf", PGD(net, eps=0.3, alpha=0.01, steps=50, random_start=False),
         ta.PGD(net, eps=0.3, alpha=0.01, steps=50, random_start=False), "fast", "fast", args.rounds, False),
        ("JSMA logits (as theirs)", JSMA(net, theta=1.0, gamma=0.1, target=target, space="logits"), jsma_theirs,
         "fast", "slow", 1, True),
        ("DeepFool os 0.02, 50 it", DeepFool(net, overshoot=0.02, max_iter=50),
         ta.DeepFool(net, steps=50, overshoot=0.02), "fast", "slow", 1, False),
        ("Square eps 0.3, 1000 q", Square(net, eps=0.3, n_queries=1000, seed=0), square_theirs,
         "fast", "fast", 1, False),
    ]
    batches = {"fast": (x, y), "slow": (xs, ys)}
    FGSM(net)(x[:2], y[:2]), DeepFool(net, max_iter=2)(x[:2], y[:2])  # warm-up
    print(f"{'attack':26s} {'ours img/s':>11s} {'theirs img/s':>13s} {'ratio':>7s}   success ours / theirs")
    results = []
    for name, ours, theirs, b_ours, b_theirs, rounds, targeted in rows:
        best_o = best_t = 0.0
        for _ in range(rounds):
            r_o, adv_o = timed(ours, *batches[b_ours])
            r_t, adv_t = timed(theirs, *batches[b_theirs])
            best_o, best_t = max(best_o, r_o), max(best_t, r_t)
        tgt_o = target[: len(adv_o)] if targeted else None
        tgt_t = target[: len(adv_t)] if targeted else None
        s_o = fooled(adv_o, batches[b_ours][1], tgt_o)
        s_t = fooled(adv_t, batches[b_theirs][1], tgt_t)
        note = ""
        if b_ours != b_theirs:  # also ours on the images torchattacks attacked
            k = len(adv_t)
            note = f"  (ours on those {k}: {fooled(adv_o[:k], y[:k], None if tgt_o is None else tgt_o[:k]):.2f})"
        print(f"{name:26s} {best_o:11.1f} {best_t:13.2f} {best_o / best_t:7.1f}x   {s_o:.2f} / {s_t:.2f}{note}",
              flush=True)
        results.append((name, best_o / best_t))

    # Our default JSMA (softmax space, as the paper's cleverhans code): no torchattacks twin.
    r, adv = timed(JSMA(net, theta=1.0, gamma=0.1, target=target, space="probs"), x, y)
    print(f"{'JSMA probs (our default)':26s} {r:11.1f} {'-':>13s} {'':7s}   {fooled(adv, y, target):.2f} / -")
    autoattack_row(ta, net, xte[ok][: args.aa_batch], yte[ok][: args.aa_batch], args.aa_eps)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s. Targets: JSMA >= 20x, DeepFool >= 3x.")


if __name__ == "__main__":
    main()
