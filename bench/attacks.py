"""Adversarial examples per second: dundi.attacks over torchattacks 3.5.1, same LeNet-5,
same images, one process. Targets: JSMA >= 20x, DeepFool >= 3x; FGSM/BIM/PGD ~1x (both
are batched; ours must simply not be slower). Last, the AutoAttack cascade (APGD-CE, APGD-T,
FAB-T, Square 5,000 queries) against torchattacks' ``AutoAttack(version="standard")`` on the
same model and images, both at ``--aa-steps`` (100) iterations: speed ratio and robust accuracy
(targets: >= 1.5x, within 0.5 pt). ``--standin-run DIR`` (with ``--native-run``) also times the
cascade on that DunDi run's exact-rule stand-in against the native model (target <= 1.3x per
step). ``--aa-only`` runs just the AutoAttack rows; ``--native-run DIR`` attacks a trained native run (e.g. the
Madry-style model) instead of the bench's own LeNet-5.

A LeNet-5 (DeepXplore's Model3, defined here) is trained for a few seconds on synthetic
10-class 28x28 images (noisy, shifted blocky prototypes), or on real MNIST digits with
``--dataset mnist-10k`` (needs the dundi data cache). torchattacks attacks JSMA and
DeepFool one image at a time, so it gets a small slice of the batch (``--slow-batch``);
rates are images/s either way. Rounds alternate ours / theirs so machine noise hits both
alike; the best round of each is kept. Success rates are printed beside the speeds to
show both sides did the same job.

    python bench/attacks.py [--batch 128] [--slow-batch 8] [--rounds 3] [--threads 1] [--dataset synthetic]
        [--aa-eps 0.1] [--aa-batch 128] [--aa-steps 100] [--aa-only] [--native-run DIR] [--standin-run DIR]
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


def torchattacks_autoattack(ta, net: nn.Module, eps: float, steps: int):
    """torchattacks' ``AutoAttack(version="standard")`` (APGD-CE, APGD-T, FAB-T, Square 5,000
    queries) with its gradient attacks set to ``steps`` iterations: its constructors default to
    10, the original AutoAttack runs 100."""
    aa = ta.AutoAttack(net, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
    for component in aa._autoattack.attacks:
        if type(component).__name__ in ("APGD", "APGDT", "FAB"):
            component.steps = steps
    return aa


def timed_cpu(fn, images, labels) -> tuple[float, float, object]:
    """(wall seconds, this thread's CPU seconds, result): CPU time is what the other users of a
    shared machine cannot take away, so ratios are printed on both."""
    t0, c0 = time.perf_counter(), time.thread_time()
    out = fn(images, labels)
    return time.perf_counter() - t0, time.thread_time() - c0, out


def autoattack_row(ta, net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 100) -> None:
    """Our cascade vs torchattacks' standard AutoAttack at the same iterations, same images:
    the speed ratio (target >= 1.5x at 100 iterations) and robust accuracy (within 0.5 pt)."""
    def robust(adv):
        with torch.no_grad():
            return (net(adv).argmax(1) == y).float().mean().item()

    with torch.random.fork_rng():
        w_t, c_t, adv_t = timed_cpu(torchattacks_autoattack(ta, net, eps, steps), x, y)
    w_o, c_o, adv_o = timed_cpu(AutoAttack(net, eps=eps, steps=steps, n_queries=5000, seed=0), x, y)
    assert (adv_t - x).abs().max() <= eps + 1e-5 and (adv_o - x).abs().max() <= eps + 1e-6
    ra_o, ra_t = robust(adv_o), robust(adv_t)
    print(f"{f'AutoAttack {steps} it':26s} {len(x) / w_o:11.2f} {len(x) / w_t:13.2f} {w_t / w_o:7.2f}x   "
          f"(CPU time {c_t / c_o:.2f}x) robust accuracy ours {ra_o:.2%} / theirs {ra_t:.2%} "
          f"({100 * (ra_o - ra_t):+.1f} pt) on {len(x)} images, eps {eps:g}", flush=True)
    print(f"AutoAttack targets: speed >= 1.5x at {steps} iterations, robust accuracy within 0.5 pt")


def standin_row(run: str, native_run: str, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> None:
    """The cascade on DunDi's exact-rule stand-in (Distance NN, oracle scores, the two-step
    rule deciding every early stop) vs on the plain native LeNet-5, same images: the rule's
    overhead per unit of attack work (gradient step or query), target <= 1.3x."""
    from dundi.evaluation.config import EvalConfig
    from dundi.evaluation.shard import Evaluator
    from dundi.run.directory import Run

    cfg = EvalConfig(run=run, native=native_run, threats=["adaptive"], limit=1)
    stand_in = Evaluator(cfg, data=(x.numpy(), y.numpy(), np.arange(len(y)))).threat("adaptive").model
    native = Run.load(native_run, with_oracle=False).model.eval()
    rows = {}
    for name, model in (("native", native), ("stand-in", stand_in)):
        wall, cpu, res = timed_cpu(AutoAttack(model, eps=eps, steps=steps, n_queries=5000, seed=0).run, x, y)
        work = int(res.steps.sum())
        rows[name] = (wall, cpu, work)
        print(f"cascade on {name:8s}: {wall:8.1f} s wall, {cpu:8.1f} s CPU, {work} steps+queries, "
              f"{1e3 * cpu / max(work, 1):.3f} CPU ms per step", flush=True)
    per = {k: v[1] / max(v[2], 1) for k, v in rows.items()}
    print(f"stand-in / native cost per step: {per['stand-in'] / per['native']:.2f}x (target <= 1.3x); "
          f"per image: {rows['stand-in'][1] / rows['native'][1]:.2f}x")


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
    ap.add_argument("--aa-steps", type=int, default=100, help="iterations of both cascades' gradient attacks")
    ap.add_argument("--standin-run", default=None,
                    help="also time the cascade on this DunDi run's exact-rule stand-in against --native-run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ta = load_torchattacks()

    t0 = time.perf_counter()
    (xtr, ytr), (xte, yte) = data(args.dataset, 3000, 2 * max(args.batch, args.aa_batch))
    if args.native_run:
        from dundi.run.directory import Run

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
        autoattack_row(ta, net, xte[ok][: args.aa_batch], yte[ok][: args.aa_batch], args.aa_eps, args.aa_steps)
        if args.standin_run:
            standin_row(args.standin_run, args.native_run, xte[ok][: args.aa_batch], yte[ok][: args.aa_batch],
                        args.aa_eps, args.aa_steps)
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
    autoattack_row(ta, net, xte[ok][: args.aa_batch], yte[ok][: args.aa_batch], args.aa_eps, args.aa_steps)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s. Targets: JSMA >= 20x, DeepFool >= 3x.")


if __name__ == "__main__":
    main()
