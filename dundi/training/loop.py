"""The one epoch loop: a local ``dundi train`` and every Ray Train worker run this code.

What differs between one process and a data-parallel worker is gathered in :class:`Worker`
(rank, world size, device, how figures are summed over workers and how the model is wrapped)
and in the ``on_epoch`` hook (a local run writes its checkpoint directory; a Ray worker
reports to Ray Train). Everything else -- per-worker data, seeded tuples and orders, PGD
starts, the certified schedule, validation, the checkpoint's contents and the resume rule --
is written once, here, as nanoGPT keeps one loop for one process and for DDP.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dundi.errors import DundiError
from dundi.training.certified import balanced_batches
from dundi.training.checkpoint import load_local, save_local
from dundi.training.config import TrainConfig, json_config, with_defaults
from dundi.training.passes import (
    adversarial_generator,
    epoch_config,
    epoch_order,
    epoch_tuples,
    make_optimizer,
    run_certified_epoch,
    run_native_epoch,
    run_triplet_epoch,
    worker_tuples,
)

KINDS = ("native", "dundi")
TIMING_KEYS = ("seconds", "tuples_per_s", "images_per_s")


def _identity(model: nn.Module) -> nn.Module:
    return model


@dataclass
class Worker:
    """One training process: alone (the defaults) or one of ``world`` DDP workers.

    ``sum`` adds a list of figures over all workers and ``min`` takes the smallest value of
    one (identities when alone); ``wrap`` puts the model on its device and under DDP."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sum: Callable[[list[float]], list[float]] = lambda values: values
    min: Callable[[float], float] = lambda value: value
    wrap: Callable[[nn.Module], nn.Module] | None = None

    def prepare(self, model: nn.Module) -> nn.Module:
        return self.wrap(model) if self.wrap is not None else model.to(self.device)


@dataclass
class Resumed:
    """What a checkpoint gives back to continue a run after its last finished epoch."""

    epoch: int
    weights: dict
    optimizer: dict
    rng: dict
    history: list[dict]
    seconds: float = 0.0


def resume_state(kind: str, cfg: TrainConfig, world: int, pretrained: str | None = None) -> dict:
    """The facts a checkpoint records so that a resumption can be checked against them."""
    return {"kind": kind, "config": json_config(cfg), "world_size": world, "pretrained": pretrained}


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """The settings that differ between a checkpoint's run and this one, as "name a -> b".

    The one resume rule, local and on Ray: every training setting, the kind, the pretrained
    backbone and the number of workers (which decides every worker's rows, tuples and batch
    size) must be unchanged, or two experiments would be mixed in one run. One exception:
    ``epochs`` may grow or shrink where nothing depends on it -- every epoch's tuples, order
    and PGD starts are seeded by the epoch alone, so a 2-epoch run continued to 3 is the 3-epoch
    run -- but not for certified training, whose learning-rate decay is placed by the total.
    Fields added to TrainConfig after a checkpoint was written count at their defaults."""
    old = {**with_defaults(saved.get("config") or {}), **{k: saved.get(k) for k in
                                                          ("kind", "world_size", "pretrained")}}
    new = {**current["config"], **{k: current.get(k) for k in ("kind", "world_size", "pretrained")}}
    if old["world_size"] is None:  # written before the worker count was recorded: one process
        old["world_size"] = 1
    if not (old.get("certified") or new.get("certified")):
        old["epochs"] = new.get("epochs")
    names = {"world_size": "workers"}
    return [f"{names.get(k, k)} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def check_resume(saved: dict, current: dict, where: str, fix: str) -> None:
    """Refuse to continue a checkpoint of another experiment (see :func:`resume_conflicts`)."""
    changed = resume_conflicts(saved, current)
    if changed:
        raise DundiError(f"{where} holds a checkpoint of a run with other settings "
                         f"({'; '.join(changed)}): resume it with the same settings, or {fix}")


def worker_config(cfg: TrainConfig, world: int) -> TrainConfig:
    """A worker's share of each step: the global batch split over ``world`` workers."""
    if world == 1:
        return cfg
    return dataclasses.replace(cfg, batch_size=math.ceil(cfg.batch_size / world),
                               cert_per_class=max(2, math.ceil(cfg.cert_per_class / world)))


class EpochPlan:
    """This worker's epochs: its data on its device and the seeded work of each epoch."""

    def __init__(self, kind: str, cfg: TrainConfig, worker: Worker, images: np.ndarray,
                 labels: np.ndarray):
        if kind not in KINDS:
            raise DundiError(f"unknown training kind {kind!r}: choose one of {', '.join(KINDS)}")
        self.kind, self.cfg, self.worker = kind, cfg, worker
        self.wcfg = worker_config(cfg, worker.world)
        self.num_classes = int(labels.max()) + 1
        self.x = torch.as_tensor(images).to(worker.device)
        self.y = torch.as_tensor(labels).to(worker.device)
        self.certified = cfg.certified  # DunDi, or the softmax IBP baseline (native)
        # DDP needs the same number of steps on every worker: each takes the smallest share
        if self.certified:
            own = len(balanced_batches(labels, self.wcfg.cert_per_class, 0, cfg.seed))
            self.steps = int(worker.min(own))
            self.work = self.steps * self.wcfg.cert_per_class * self.num_classes * worker.world
        elif kind == "dundi":
            self.tuples = worker_tuples(labels, cfg, worker.rank, worker.world)
            self.work = len(self.tuples) * worker.world
        else:
            self.count = int(min(worker.min(len(labels)), len(labels)))
            self.work = self.count * worker.world
        self.unit = "tuples_per_s" if kind == "dundi" else "images_per_s"

    def run(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
            progress: bool) -> dict[str, float]:
        """One epoch of this worker's training; returns its two training figures."""
        cfg, worker, desc = self.cfg, self.worker, f"epoch {epoch + 1}/{self.cfg.epochs}"
        progress = progress and worker.rank == 0
        if self.certified:
            return run_certified_epoch(model, optimizer, self.x, self.y, self.wcfg, epoch, progress, desc,
                                       rank=worker.rank, steps=self.steps, num_classes=self.num_classes,
                                       kind=self.kind)
        ecfg = epoch_config(self.wcfg, epoch)
        gen = adversarial_generator(cfg, epoch, worker.rank)
        if self.kind == "dundi":
            return run_triplet_epoch(model, optimizer, self.x, self.y, epoch_tuples(self.tuples, epoch, cfg.seed),
                                     ecfg, progress, desc, generator=gen)
        order = (epoch_order(self.count, epoch, cfg.seed) if worker.world == 1 else
                 np.random.default_rng([cfg.seed, epoch, worker.rank]).permutation(len(self.y))[:self.count])
        return run_native_epoch(model, optimizer, self.x, self.y, order, ecfg, progress, generator=gen)


EpochHook = Callable[[int, dict[str, Any], nn.Module, torch.optim.Optimizer, dict], None]


def train_epochs(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, kind: str,
                 worker: Worker | None = None, *, validate: Callable[[nn.Module], float] | None = None,
                 val_count: int = 0, resumed: Resumed | None = None, on_epoch: EpochHook | None = None,
                 progress: bool = True, state: dict | None = None) -> list[dict]:
    """Train ``model`` on this worker's ``images``/``labels`` from the epoch after ``resumed``
    (or the first) to ``cfg.epochs``; returns the metric history of every epoch.

    Each epoch's figures are averaged over workers (validation weighted by ``val_count``,
    this worker's held-out images). ``on_epoch(epoch, metrics, inner_model, optimizer, state)``
    runs on every worker after every epoch with the checkpoint state to save: the caller
    writes it (locally) or reports it (Ray Train, rank 0 with the checkpoint)."""
    worker = worker or Worker()
    torch.manual_seed(cfg.seed)
    plan = EpochPlan(kind, cfg, worker, images, labels)
    start, history, seconds = 0, [], 0.0
    if resumed is not None:
        model.load_state_dict(resumed.weights)
        start, history, seconds = resumed.epoch + 1, list(resumed.history), resumed.seconds
    model = worker.prepare(model)
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = make_optimizer(inner, cfg)
    if resumed is not None:
        optimizer.load_state_dict(resumed.optimizer)
        restore_rng(resumed.rng)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        figures = plan.run(model, optimizer, epoch, progress)
        train_seconds = time.perf_counter() - t0
        metrics = _epoch_metrics(figures, worker, inner, validate, val_count)
        metrics["epoch"] = epoch
        seconds += time.perf_counter() - t0
        history.append({**metrics, "seconds": round(train_seconds, 4), plan.unit: plan.work / train_seconds})
        if on_epoch is not None:
            on_epoch(epoch, metrics, inner, optimizer,
                     {**(state or {}), "epoch": epoch, "history": history, "seconds": seconds})
    return history


def _epoch_metrics(figures: dict[str, float], worker: Worker, model: nn.Module,
                   validate: Callable[[nn.Module], float] | None, val_count: int) -> dict[str, Any]:
    """The epoch's training figures averaged over workers, and the validation accuracy of all
    workers' held-out images together."""
    names = list(figures)
    val = [validate(model) * val_count, float(val_count)] if validate is not None and val_count else [0.0, 0.0]
    sums = worker.sum([*(figures[k] for k in names), *val])
    metrics: dict[str, Any] = {k: sums[i] / worker.world for i, k in enumerate(names)}
    if sums[-1] > 0:
        metrics["val_accuracy"] = sums[-2] / sums[-1]
    return metrics


def restore_rng(rng: dict) -> None:
    """Torch's CPU (and, where saved and present, CUDA) RNG state from a checkpoint."""
    torch.set_rng_state(rng["torch"])
    cuda = [rng[f"cuda/{i}"] for i in range(torch.cuda.device_count()) if f"cuda/{i}" in rng]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (the default): the GPU when PyTorch sees one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DundiError(f"--device {device}: PyTorch sees no CUDA GPU here; use --device cpu "
                         f"(or auto), or install a CUDA build of torch")
    return torch.device(device)


def fit(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, kind: str = "dundi",
        validate: Callable[[nn.Module], float] | None = None,
        on_epoch: Callable[[int, dict], None] | None = None, progress: bool = True,
        checkpoints: Path | None = None, device: str | None = None,
        pretrained: str | None = None) -> list[dict]:
    """Train in this process (:func:`train_epochs` as one worker on ``device``).

    With ``checkpoints`` (a directory) every epoch ends with a checkpoint there, and a call that
    finds one continues after its epoch instead of starting over: tuples, sample order and PGD
    starts are seeded per epoch, so the resumed run is the run that was not killed. A
    checkpoint of other settings is refused (:func:`resume_conflicts`)."""
    current = resume_state(kind, cfg, 1, pretrained)
    resumed = None
    saved = load_local(checkpoints) if checkpoints is not None else None
    if saved is not None:
        state, weights, optimizer, rng = saved
        check_resume(state, current, str(checkpoints), "delete it to start over, or use another --out")
        resumed = Resumed(state["epoch"], weights, optimizer, rng, state["history"], state.get("seconds", 0.0))

    def after_epoch(epoch: int, metrics: dict, inner: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict) -> None:
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if checkpoints is not None:
            save_local(checkpoints, epoch, inner, optimizer, state)

    history = train_epochs(model, images, labels, cfg, kind, Worker(device=resolve_device(device)),
                           validate=validate, val_count=1, resumed=resumed, on_epoch=after_epoch,
                           progress=progress, state=current)
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]
