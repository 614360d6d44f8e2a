"""Plain PyTorch training passes: native softmax models and triplet training of the Distance NN.

One config dataclass (:class:`dundi.training.config.TrainConfig`) drives them. The per-epoch functions take whatever
model they are given (a plain module, or a DDP-wrapped one on a Ray Train worker) and the
slice of data that process owns, so the Ray edge reuses them unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dundi.progress import on_terminal  # bars only on a terminal; epochs are logged as lines
from dundi.training.adversarial import (
    adversarial_anchors,
    adversarial_anchors_to_classes,
    adversarial_inputs_ce,
    class_prototypes,
    prototype_distances,
)
from dundi.training.certified import (
    balanced_batches,
    certified_batch_loss,
    schedule,
    softmax_certified_batch_loss,
)
from dundi.training.config import TrainConfig
from dundi.training.losses import distance, mine_batch_hard, triplet_loss, tuple_distances
from dundi.training.tuples import sample_tuples


def split_train_val(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation index split of the training set."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_val = int(round(fraction * len(labels)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def epoch_tuples(tuples: np.ndarray, epoch: int, seed: int) -> np.ndarray:
    """The tuple set in this epoch's order (a seeded shuffle, the same on every worker)."""
    return tuples[np.random.default_rng([seed, epoch]).permutation(len(tuples))]


def make_tuples(labels: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    return sample_tuples(labels, cfg.tuples, cfg.seed)


def worker_tuples(labels: np.ndarray, cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """The tuple set of one data-parallel worker, drawn from that worker's own samples.

    Alone (``world_size == 1``) this is exactly ``make_tuples``, so one worker reproduces the
    local loop. Otherwise each worker draws ``cfg.tuples // world_size`` tuples seeded by
    ``(seed, rank)``: equal counts keep every worker's step count the same, as DDP requires.
    """
    if world_size == 1:
        return make_tuples(labels, cfg)
    return sample_tuples(labels, cfg.tuples // world_size, np.random.SeedSequence([cfg.seed, rank]))


def epoch_config(cfg: TrainConfig, epoch: int) -> TrainConfig:
    """The config of one epoch: with ``adv_warmup`` the PGD budget grows linearly over the first
    epochs (eps·1/W, eps·2/W, …, eps), since PGD training at the full budget from random
    weights can stall at chance on small networks (seen: LeNet-5 on mnist-10k at eps 0.3)."""
    if not cfg.adversarial or cfg.adv_warmup <= 0 or epoch + 1 >= cfg.adv_warmup:
        return cfg
    return dataclasses.replace(cfg, adv_eps=cfg.adv_eps * (epoch + 1) / cfg.adv_warmup)


def adversarial_generator(cfg: TrainConfig, epoch: int, rank: int = 0) -> torch.Generator | None:
    """The RNG of one epoch's PGD random starts, seeded by (seed, epoch, rank): a resumed or
    distributed run draws the same starts as a local one, whatever else used torch's global RNG."""
    if not cfg.adversarial:
        return None
    seed = int(np.random.default_rng([cfg.seed, epoch, rank]).integers(2**62))
    return torch.Generator().manual_seed(seed)


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The order of ``n`` samples in one native-training epoch (seeded by seed and epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def triplet_batch_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       batch: np.ndarray, cfg: TrainConfig, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and the fraction of tuples ordered correctly (d_an > d_ap) for a (B, 3) batch.

    With ``cfg.dedupe`` each distinct image is embedded once and the tuples are formed from
    those embeddings; otherwise anchor, positive and negative take three forward passes, as
    in the paper's triplet network. Both give the same loss values.
    """
    if cfg.dedupe or cfg.mining == "batch-hard":
        uniq, inverse = np.unique(batch, return_inverse=True)
        emb = model(images[torch.from_numpy(uniq)])
        if cfg.mining == "batch-hard":
            d_ap, d_an = mine_batch_hard(emb, labels[torch.from_numpy(uniq)])
            emb_p = emb_n = None
        else:
            inv = torch.from_numpy(inverse.reshape(batch.shape))
            emb_p, emb_n = emb[inv[:, 1]], emb[inv[:, 2]]
            d_ap, d_an = tuple_distances(emb[inv[:, 0]], emb_p, emb_n)
    else:
        idx = torch.from_numpy(batch)
        emb_p, emb_n = model(images[idx[:, 1]]), model(images[idx[:, 2]])
        d_ap, d_an = tuple_distances(model(images[idx[:, 0]]), emb_p, emb_n)
    loss = triplet_loss(d_ap, d_an, cfg.loss, cfg.margin).mean()
    ordered = (d_an > d_ap).float().mean()
    if cfg.adversarial:
        if emb_p is None:
            raise ValueError("adversarial triplet training uses the random tuples, not batch-hard mining")
        idx = torch.from_numpy(batch)
        adv_loss = (_adversarial_class_loss(model, images[idx[:, 0]], labels[idx], emb_p, emb_n, cfg,
                                            int(labels.max()) + 1, generator)
                    if cfg.adv_target == "classes" else
                    _adversarial_tuple_loss(model, images[idx[:, 0]], emb_p, emb_n, cfg, generator))
        loss = (1 - cfg.adv_mix) * loss + cfg.adv_mix * adv_loss
    return loss, ordered


def _adversarial_tuple_loss(model: nn.Module, x_a: torch.Tensor, emb_p: torch.Tensor,
                            emb_n: torch.Tensor, cfg: TrainConfig,
                            generator: torch.Generator | None) -> torch.Tensor:
    """DunDi-AT, ``adv_target="tuple"``: the triplet loss of PGD anchors that maximise it."""
    def loss_of(ea: torch.Tensor, ep: torch.Tensor, en: torch.Tensor) -> torch.Tensor:
        return triplet_loss(*tuple_distances(ea, ep, en), cfg.loss, cfg.margin)

    x_adv = adversarial_anchors(model, x_a, emb_p, emb_n, loss_of, cfg.adv_eps,
                                cfg.adv_step_size, cfg.adv_steps, generator)
    return loss_of(model(x_adv), emb_p, emb_n).mean()


def _adversarial_class_loss(model: nn.Module, x_a: torch.Tensor, tuple_labels: torch.Tensor,
                            emb_p: torch.Tensor, emb_n: torch.Tensor, cfg: TrainConfig,
                            num_classes: int, generator: torch.Generator | None) -> torch.Tensor:
    """DunDi-AT, ``adv_target="classes"``: anchors pushed by PGD towards the nearest other
    class (prototypes: the batch's positive and negative embeddings per class, as the oracle
    database stands for them at test time), then trained to stay in their class.

    ``adv_loss="prototype"`` (default): cross-entropy over the negated distances from each
    adversarial anchor to every class prototype, i.e. the N-pair generalisation of the triplet
    loss; it keeps a gradient for anchors pushed far into another class and does not reward a
    collapsed embedding. ``adv_loss="triplet"`` (TLA, Mao et al. 2019): the triplet loss with
    the anchor's positive and its hardest negative in the batch. Measured on mnist-10k LeNet-5
    at eps 0.3 (docs/results): prototype 88.5% adaptive robust accuracy, triplet 24.5%; with
    adv_mix 1.0 the triplet form collapsed."""
    ref = torch.cat([emb_p, emb_n])
    ref_labels = torch.cat([tuple_labels[:, 1], tuple_labels[:, 2]])
    y_a = tuple_labels[:, 0]
    prototypes = class_prototypes(ref, ref_labels, num_classes)  # PGD sees them detached
    x_adv = adversarial_anchors_to_classes(model, x_a, y_a, prototypes, cfg.adv_eps,
                                           cfg.adv_step_size, cfg.adv_steps, generator)
    emb_adv = model(x_adv)
    if cfg.adv_loss == "prototype":
        # N-pair form: softmax over the (negated) distances to every class prototype; unlike a
        # single triplet it neither saturates for far-misplaced anchors nor rewards collapse
        return nn.functional.cross_entropy(-prototype_distances(emb_adv, prototypes), y_a)
    d_ap = distance(emb_adv, emb_p)
    d_all = torch.cdist(emb_adv, ref)
    d_an = torch.where(ref_labels[None, :] != y_a[:, None], d_all,
                       torch.full_like(d_all, float("inf"))).amin(1)
    return triplet_loss(d_ap, d_an, cfg.loss, cfg.margin).mean()


def run_triplet_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                      labels: torch.Tensor, tuples: np.ndarray, cfg: TrainConfig,
                      progress: bool = True, desc: str = "triplet",
                      generator: torch.Generator | None = None) -> dict[str, float]:
    """One pass over ``tuples`` (already in this epoch's order). Returns mean loss and the
    fraction of tuples ordered correctly. ``generator`` draws the PGD random starts of
    adversarial training (:func:`adversarial_generator`)."""
    model.train()
    total_loss = total_ok = seen = 0.0
    steps = range(0, len(tuples), cfg.batch_size)
    bar = tqdm(steps, desc=desc, disable=not (progress and on_terminal()), leave=False)
    for start in bar:
        batch = tuples[start:start + cfg.batch_size]
        loss, ok = triplet_batch_loss(model, images, labels, batch, cfg, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(batch)
        total_ok += ok.item() * len(batch)
        seen += len(batch)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    return {"loss": total_loss / max(seen, 1), "ordered": total_ok / max(seen, 1)}


def run_native_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                     labels: torch.Tensor, order: np.ndarray, cfg: TrainConfig,
                     progress: bool = True, generator: torch.Generator | None = None) -> dict[str, float]:
    """One cross-entropy pass over ``images[order]`` (``generator``: as in run_triplet_epoch)."""
    model.train()
    total = correct = seen = 0.0
    bar = tqdm(range(0, len(order), cfg.batch_size), desc="native", disable=not (progress and on_terminal()),
               leave=False)
    for start in bar:
        idx = torch.from_numpy(order[start:start + cfg.batch_size])
        logits = model(images[idx])
        loss = nn.functional.cross_entropy(logits, labels[idx])
        if cfg.adversarial:  # Madry et al. 2018: train on PGD examples of the current model
            x_adv = adversarial_inputs_ce(model, images[idx], labels[idx], cfg.adv_eps,
                                          cfg.adv_step_size, cfg.adv_steps, generator)
            adv_loss = nn.functional.cross_entropy(model(x_adv), labels[idx])
            loss = (1 - cfg.adv_mix) * loss + cfg.adv_mix * adv_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        correct += (logits.argmax(1) == labels[idx]).sum().item()
        seen += len(idx)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return {"loss": total / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


def certified_lr_factor(epoch: int, epochs: int) -> float:
    """Learning-rate factor of certified training: 1, then 0.3 from 75 % of the epochs and 0.1
    from 90 % (the final fine-tuning at the full budget raised certified accuracy)."""
    progress = epoch / max(epochs, 1)
    return 1.0 if progress < 0.75 else 0.3 if progress < 0.9 else 0.1


def run_certified_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                        labels: torch.Tensor, cfg: TrainConfig, epoch: int, progress: bool = True,
                        desc: str = "certified", rank: int = 0, steps: int | None = None,
                        num_classes: int | None = None, kind: str = "dundi") -> dict[str, float]:
    """One pass of certified training (:mod:`dundi.training.certified`) over class-balanced
    batches of this process's images. ``steps`` caps the batches (data-parallel workers must
    take the same number); eps and the loss mix follow the schedule within the epoch too.
    ``kind`` "native" trains the softmax IBP baseline on the very same batches and schedule."""
    model.train()
    for group in optimizer.param_groups:  # step decay: a function of the epoch, so resumes agree
        group["lr"] = cfg.lr * certified_lr_factor(epoch, cfg.epochs)
    num_classes = num_classes or int(labels.max()) + 1
    batches = balanced_batches(labels.cpu().numpy(), cfg.cert_per_class, epoch, cfg.seed + 7919 * rank)
    batches = batches[:steps] if steps is not None else batches
    totals = {"loss": 0.0, "certified": 0.0}
    bar = tqdm(batches, desc=desc, disable=not (progress and on_terminal()), leave=False)
    for i, batch in enumerate(bar):
        eps, mix = schedule(epoch + i / len(batches), cfg.cert_warmup, cfg.cert_ramp, cfg.cert_eps,
                            cfg.cert_mix)
        idx = torch.from_numpy(batch).to(images.device)
        batch_loss = softmax_certified_batch_loss if kind == "native" else certified_batch_loss
        loss, stats = batch_loss(model, images[idx], labels[idx], num_classes, eps, mix)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals["loss"] += loss.item()
        totals["certified"] += stats.get("certified", 0.0)
        bar.set_postfix(loss=f"{totals['loss'] / (i + 1):.4f}", eps=f"{eps:.3f}")
    count = max(len(batches), 1)  # the same two figures the Ray Train workers report
    return {"loss": totals["loss"] / count, "batch_certified": totals["certified"] / count}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr)
