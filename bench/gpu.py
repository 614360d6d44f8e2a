"""The GPU side of DunDi's heavy work, each timed on the CPU and on the GPU in one run, ratio
printed: DunDi-AT training (tuples/s through the same epoch loop `dundi train` runs) and APGD
on the exact two-step rule (images/s, the adaptive threat model of `dundi evaluate`).

The CPU side uses every core torch is given (``torch.get_num_threads()``, printed). Both sides
train the same seeded model on the same mnist-10k tuples; the attack runs on a briefly
trained DunDi_R with an index of n oracles per class.

    python bench/gpu.py [--tuples 4096] [--batch 128] [--adv-steps 10] [--images 512] [--apgd-steps 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from dundi.attacks.apgd import APGD
from dundi.data import load_split
from dundi.nets.inference import forward_batched
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.rule.reference import TwoStepScorer
from dundi.run.pipeline import new_distance_net
from dundi.training.config import TrainConfig
from dundi.training.loop import Worker, train_epochs


def train_rate(cfg: TrainConfig, x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[float, torch.nn.Module]:
    """Tuples/s of one DunDi-AT epoch on ``device`` (after a short warm-up epoch)."""
    warm = TrainConfig(**{**cfg.__dict__, "tuples": 256, "epochs": 1})
    model, _ = new_distance_net(warm, None)
    train_epochs(model, x, y, warm, "dundi", Worker(device=device), progress=False)
    model, _ = new_distance_net(cfg, None)
    sync(device)
    t0 = time.perf_counter()
    train_epochs(model, x, y, cfg, "dundi", Worker(device=device), progress=False)
    sync(device)
    return cfg.tuples / (time.perf_counter() - t0), model


def attack_rate(model: torch.nn.Module, index: OracleIndex, x: np.ndarray, y: np.ndarray, steps: int,
                device: torch.device) -> tuple[float, float]:
    """Images/s of APGD-DLR on the exact two-step stand-in (n, m=3, k=5) and its robust accuracy."""
    rule = index.resolve(TwoStepRule())
    oracles = torch.from_numpy(index.padded(rule.n)[0])
    scorer = TwoStepScorer(model.to(device), oracles.to(device), rule).eval()
    attack = APGD(scorer, eps=0.3, steps=steps, loss="dlr", seed=0)
    xt, yt = torch.as_tensor(x[:32]), torch.as_tensor(y[:32])
    attack.run(xt, yt)  # warm-up (kernels, allocator)
    sync(device)
    t0 = time.perf_counter()
    adv = attack.run(torch.as_tensor(x), torch.as_tensor(y)).adv
    sync(device)
    rate = len(x) / (time.perf_counter() - t0)
    with torch.no_grad():
        robust = (scorer(adv).argmax(1).cpu().numpy() == y).mean()
    return rate, float(robust)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tuples", type=int, default=4096)
    p.add_argument("--batch", type=int, default=128, help="tuples per training step (default %(default)s)")
    p.add_argument("--adv-steps", type=int, default=10)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--apgd-steps", type=int, default=50)
    p.add_argument("--oracles", type=int, default=20)
    p.add_argument("--device", default="cuda", help="the accelerated side (default %(default)s)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU: PyTorch sees none here")
    gpu, cpu = torch.device(args.device), torch.device("cpu")
    x, y, _ = load_split("mnist-10k", "train")
    tx, ty, _ = load_split("mnist-10k", "test", limit=args.images)
    cfg = TrainConfig(arch="lenet5", epochs=1, tuples=args.tuples, batch_size=args.batch, adversarial=True,
                      adv_eps=0.3, adv_steps=args.adv_steps)
    name = torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else str(gpu)
    print(f"GPU side: {name}; CPU side: {torch.get_num_threads()} torch threads; DunDi-AT: {args.tuples} "
          f"tuples, batch {args.batch}, PGD {args.adv_steps} steps; APGD: {len(ty)} images in one batch")
    rows = {}
    cpu_train, _ = train_rate(cfg, x, y, cpu)
    gpu_train, model = train_rate(cfg, x, y, gpu)
    rows["dundi_at_tuples_per_s"] = (cpu_train, gpu_train)
    pick = OracleIndex.select(y, args.oracles, 0, 10)
    emb = forward_batched(model, x[pick])
    index = OracleIndex(emb, 10)
    cpu_att, cpu_rob = attack_rate(model.cpu(), index, tx, ty, args.apgd_steps, cpu)
    gpu_att, gpu_rob = attack_rate(model, index, tx, ty, args.apgd_steps, gpu)
    rows["apgd_exact_rule_images_per_s"] = (cpu_att, gpu_att)
    for name, (c, g) in rows.items():
        print(f"{name:32s} cpu {c:10.1f}  gpu {g:10.1f}  gpu/cpu {g / c:6.1f}x")
    print(f"APGD robust accuracy (eps 0.3, {args.apgd_steps} steps, {len(ty)} test images, 1-epoch "
          f"DunDi-AT, n={args.oracles} m=3 k=5): cpu {cpu_rob:.3f}, gpu {gpu_rob:.3f}")
    if args.json:
        print(json.dumps({k: {"cpu": c, "gpu": g, "ratio": g / c} for k, (c, g) in rows.items()}))


if __name__ == "__main__":
    main()
