"""Run-level operations that the CLI, the demo and the Ray edge share: train a native model,
train a Distance NN, build its oracle index, measure two-step accuracy.

Each function reads its data through :mod:`dundi.data`, writes a run directory through
:mod:`dundi.run.storage`, and returns the figures it computed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from dundi.data import DATASETS, load_split
from dundi.errors import DundiError
from dundi.files import atomic_write_json
from dundi.nets.inference import accuracy, forward_batched
from dundi.nets.models import EMBED_HIDDEN, build_distance_net, build_native
from dundi.rule.abstain_store import CALIBRATION_LIMIT, stored_calibration
from dundi.rule.index import OracleIndex
from dundi.rule.distance import SQEUCLIDEAN, distance_named
from dundi.rule.params import DEFAULT_METRIC, ORACLES_PER_CLASS, ResolvedRule, TwoStepRule
from dundi.robustness.verifiers import DEFAULT_VERIFIER
from dundi.run.directory import Run
from dundi.run.names import ORACLE_KINDS, ORACLE_SEED
from dundi.run.rows import drop_holdout, run_rows  # noqa: F401 (re-exported)
from dundi.run.storage import (
    dataset_class_names,
    index_sha256,
    load_model,
    save_model,
    save_oracle,
)
from dundi.training.config import TrainConfig
from dundi.training.loop import fit
from dundi.training.passes import split_train_val

METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = ".checkpoint"   # per-epoch training checkpoints of an unfinished local run


def _spec(dataset: str):
    if dataset not in DATASETS:
        raise DundiError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def _metrics_writer(run_dir: Path, log: Callable[[str], None]) -> Callable[[int, dict], None]:
    """Per-epoch callback: prints the epoch's figures and rewrites metrics.json atomically.
    A resumed run keeps the epochs before the one it resumes at, once each."""
    history: list[dict] = []

    def on_epoch(epoch: int, metrics: dict) -> None:
        nonlocal history
        if not history and epoch > 0 and (run_dir / METRICS_FILE).exists():
            history = [h for h in json.loads((run_dir / METRICS_FILE).read_text()) if h.get("epoch", 0) < epoch]
            log(f"  resumed after epoch {epoch - 1} from {run_dir / CHECKPOINT_DIR}")
        history.append({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()})
        atomic_write_json(run_dir / METRICS_FILE, history)
        log("  epoch " + " ".join(f"{k}={v}" for k, v in history[-1].items()))

    return on_epoch


def kept_classes(cfg: TrainConfig, num_classes: int) -> np.ndarray:
    """The dataset classes a run trains on, in order: all but ``cfg.holdout_classes``."""
    bad = [c for c in cfg.holdout_classes if not 0 <= c < num_classes]
    kept = np.array([c for c in range(num_classes) if c not in cfg.holdout_classes], dtype=np.int64)
    if bad or len(kept) < 2:
        raise DundiError(f"--holdout-classes {list(cfg.holdout_classes)} must name classes in "
                         f"[0, {num_classes}) and leave at least two to train on")
    return kept


def run_meta(kind: str, cfg: TrainConfig, **extra) -> dict:
    spec = _spec(cfg.dataset)
    kept = kept_classes(cfg, spec.num_classes)
    holdout = {"dataset_classes": kept.tolist()} if cfg.holdout_classes else {}
    if kind == "native" and native_hidden(cfg) is not None:  # how build_from_meta rebuilds it
        extra = {"hidden": native_hidden(cfg), **extra}
    return {"kind": kind, "arch": cfg.arch, "dataset": cfg.dataset, "in_shape": list(spec.shape),
            "num_classes": len(kept), **holdout, "seed": cfg.seed, "config": dataclasses.asdict(cfg),
            **extra}


def native_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    return accuracy(forward_batched(model, images).argmax(1), labels)


def two_step_accuracy(model: nn.Module, oracle_images: np.ndarray, oracle_labels: np.ndarray,
                      images: np.ndarray, labels: np.ndarray, num_classes: int, metric: str,
                      rule: TwoStepRule | None = None) -> float:
    """Two-step accuracy of a Distance NN under ``rule`` (the default request) with an oracle
    set given as images, ranked by the run's ``metric`` (validation): the oracle set is an
    index of its own, which resolves the request once."""
    index = OracleIndex.from_embeddings(forward_batched(model, oracle_images), oracle_labels, num_classes,
                                        metric=metric)
    return accuracy(index.classify(forward_batched(model, images), rule).labels, labels)


@dataclasses.dataclass
class TrainingRows:
    """What one training process learns from: its rows, a seeded train/validation split of
    them, and the per-epoch validator of its kind (None without validation rows)."""

    images: np.ndarray
    labels: np.ndarray
    tr: np.ndarray
    va: np.ndarray
    validate: Callable[[nn.Module], float] | None


def training_rows(cfg: TrainConfig, kind: str, images: np.ndarray, labels: np.ndarray,
                  ids: np.ndarray) -> TrainingRows:
    """Rows of the training split → :class:`TrainingRows`: the held-out classes dropped, the
    seeded split, and validation by two-step accuracy (dundi) or softmax accuracy (native).
    Local training calls it on all rows and every Ray worker on its own share, so the two
    prepare data alike by construction."""
    images, labels, _ = drop_holdout(images, labels, ids, kept_classes(cfg, _spec(cfg.dataset).num_classes))
    tr, va = split_train_val(labels, cfg.val_fraction, cfg.seed)
    if kind == "dundi":
        validate = triplet_validator(cfg, images, labels, tr, va)
    else:
        validate = (lambda m: native_accuracy(m, images[va], labels[va])) if len(va) else None
    return TrainingRows(images, labels, tr, va, validate)


def _local_rows(cfg: TrainConfig, kind: str, data_dir: str | None) -> TrainingRows:
    return training_rows(cfg, kind, *load_split(cfg.dataset, "train", data_dir, limit=cfg.limit))


def train_native_run(cfg: TrainConfig, out: str | os.PathLike, data_dir: str | None = None,
                     progress: bool = True, log: Callable[[str], None] = print,
                     device: str | None = None) -> dict:
    """Train a native softmax model, save it as a run, return its metadata with test accuracy."""
    cfg.validate()
    out = Path(out)
    rows = _local_rows(cfg, "native", data_dir)
    model = new_native_net(cfg)
    t0 = time.time()
    fit(model, rows.images[rows.tr], rows.labels[rows.tr], cfg, "native", rows.validate,
        _metrics_writer(out, log), progress,
        checkpoints=out / CHECKPOINT_DIR, device=device)
    test_x, test_y, _ = load_split(cfg.dataset, "test", data_dir)
    metrics = {"test_accuracy": native_accuracy(model, test_x, test_y), "test_count": len(test_y),
               "train_seconds": round(time.time() - t0, 2)}
    return _finish(out, model, run_meta("native", cfg, metrics=metrics))


def _finish(out: Path, model: nn.Module, meta: dict) -> dict:
    """Save the run, then drop its training checkpoints (the run supersedes them)."""
    saved = save_model(out, model, meta)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return saved


def native_hidden(cfg: TrainConfig) -> int | None:
    """The hidden layer of a certified native run: the width certified DunDi's Embedding
    module has on this backbone, so the softmax IBP baseline is the same network up to its
    last layer (None: the paper's native models, logits straight from the features)."""
    return EMBED_HIDDEN.get(cfg.arch, 256) if cfg.certified else None


def prototype_count(cfg: TrainConfig) -> int:
    """How many learned prototypes a DunDi run carries: one per class under certified
    training's prototype head, else none (how build_from_meta rebuilds it: meta["prototypes"])."""
    if not (cfg.certified and cfg.cert_head == "prototypes"):
        return 0
    return len(kept_classes(cfg, _spec(cfg.dataset).num_classes))


def new_native_net(cfg: TrainConfig) -> nn.Module:
    """A native model with weights initialised from ``cfg.seed`` (the same on every machine)."""
    spec = _spec(cfg.dataset)
    torch.manual_seed(cfg.seed)
    return build_native(cfg.arch, spec.shape, spec.num_classes, hidden=native_hidden(cfg))


def new_distance_net(cfg: TrainConfig, pretrained: str | os.PathLike | None) -> tuple[nn.Module, dict]:
    """DunDi_R (fresh backbone) or DunDi_P (frozen backbone of a native run); the new layers
    are initialised from ``cfg.seed``."""
    spec = _spec(cfg.dataset)
    torch.manual_seed(cfg.seed)
    if pretrained is None:
        prototypes = prototype_count(cfg)
        return (build_distance_net(cfg.arch, spec.shape, cfg.embed_dim, prototypes=prototypes),
                {"mode": "R", **({"prototypes": prototypes} if prototypes else {})})
    native, nmeta = load_model(pretrained)
    if nmeta["kind"] != "native":
        raise DundiError(f"--pretrained {pretrained} is not a native run (it is {nmeta['kind']!r})")
    if nmeta["dataset"] != cfg.dataset or nmeta["arch"] != cfg.arch:
        raise DundiError(f"--pretrained {pretrained} is a {nmeta['arch']} on {nmeta['dataset']}, "
                         f"but this run asks for {cfg.arch} on {cfg.dataset}")
    return (build_distance_net(cfg.arch, spec.shape, cfg.embed_dim, pretrained=native),
            {"mode": "P", "pretrained": str(pretrained),
             "pretrained_sha256": nmeta["files"]["model.safetensors"]})


def triplet_validator(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, tr: np.ndarray,
                      va: np.ndarray) -> Callable[[nn.Module], float] | None:
    """Per-epoch validation: two-step accuracy on the held-out part, oracles from the rest."""
    if not len(va):
        return None
    num_classes = len(kept_classes(cfg, _spec(cfg.dataset).num_classes))
    oracle_idx = tr[OracleIndex.select(labels[tr], cfg.val_oracles, cfg.seed, num_classes)]
    return lambda m: two_step_accuracy(m, images[oracle_idx], labels[oracle_idx], images[va],
                                       labels[va], num_classes, cfg.metric)


def train_dundi_run(cfg: TrainConfig, out: str | os.PathLike, pretrained: str | None = None,
                    data_dir: str | None = None, progress: bool = True,
                    log: Callable[[str], None] = print, device: str | None = None) -> dict:
    """Triplet-train a Distance NN (DunDi_R, or DunDi_P from ``pretrained``) and save the run."""
    cfg.validate()
    out = Path(out)
    rows = _local_rows(cfg, "dundi", data_dir)
    model, mode = new_distance_net(cfg, pretrained)
    t0 = time.time()
    history = fit(model, rows.images[rows.tr], rows.labels[rows.tr], cfg, "dundi", rows.validate,
                  _metrics_writer(out, log), progress,
                  checkpoints=out / CHECKPOINT_DIR, device=device, pretrained=pretrained)
    metrics = {"train_seconds": round(time.time() - t0, 2), "final": history[-1]}
    warn_if_collapsed(cfg, history, len(kept_classes(cfg, _spec(cfg.dataset).num_classes)), log)
    return _finish(out, model, run_meta("dundi", cfg, embed_dim=cfg.embed_dim, metrics=metrics, **mode))


def warn_if_collapsed(cfg: TrainConfig, history: list[dict], num_classes: int,
                      log: Callable[[str], None]) -> None:
    """Certified training can collapse to a constant embedding (every worst-case margin 0, the
    loss log C) when the budget grows faster than the network can follow; say so plainly."""
    val = history[-1].get("val_accuracy") if history else None
    if cfg.certified and val is not None and val < 2.0 / num_classes:
        log(f"WARNING: certified training ended at {val:.1%} validation accuracy (chance is "
            f"{1 / num_classes:.0%}): the embedding collapsed. Retrain with a longer --cert-warmup "
            f"and --cert-ramp (e.g. {max(3.0, 2 * cfg.cert_warmup):g} and {max(10.0, 2 * cfg.cert_ramp):g}) "
            f"or a smaller --lr.")


def build_index(run_dir: str | os.PathLike, n: int = ORACLES_PER_CLASS, seed: int = ORACLE_SEED,
                data_dir: str | None = None, margin_eps: float | None = None,
                oracle_kind: str | None = None, **margin_fit: int) -> OracleIndex:
    """Pick n oracle samples per class from the training split (seeded), embed them with the
    run's model and write the FAISS index into the run as its next version. The index holds
    the classes the run was trained on, named as the dataset names them: classes enrolled
    since (`dundi index add`) are not carried over. With ``margin_eps`` the oracles are chosen
    for certified margin at that L∞ budget (:mod:`dundi.robustness.margin_oracles`; certified
    runs only; ``margin_fit`` passes pool, fit_images and steps on), else herded toward the
    run's learned prototypes where it has them (``--cert-head prototypes``), else at random.

    ``oracle_kind``: "images" (training images, as above) or "prototypes" (a prototype run's
    learned prototypes themselves, two vectors per class,
    :func:`~dundi.robustness.margin_oracles.prototype_vectors`); by default prototypes for such
    a run (images cannot realise its head: docs/results/certified/equal-terms), else images.

    A run without a shape basis gets one too (:mod:`dundi.run.shape_fit`): the abstain rule's
    shape signal reads it, and a service never writes into the run."""
    index = _build_index(run_dir, n, seed, data_dir, margin_eps, oracle_kind, **margin_fit)
    from dundi.run.shape_fit import ensure_shape_basis  # the abstain rule's shape basis, once

    ensure_shape_basis(run_dir, data_dir)
    return index


def _build_index(run_dir: str | os.PathLike, n: int, seed: int, data_dir: str | None, margin_eps: float | None,
                 oracle_kind: str | None, **margin_fit: int) -> OracleIndex:
    model, meta = load_model(run_dir)
    if meta["kind"] != "dundi":
        raise DundiError(f"{run_dir} is a native run: an oracle index needs a DunDi run")
    if oracle_kind not in (None, *ORACLE_KINDS):
        raise DundiError(f"unknown oracle kind {oracle_kind!r}: choose one of {', '.join(ORACLE_KINDS)}")
    if oracle_kind is None:
        oracle_kind = "prototypes" if meta.get("prototypes") and margin_eps is None else "images"
    if oracle_kind == "prototypes":
        if margin_eps is not None:
            raise DundiError("--select-eps chooses training images: give it with --oracle-kind images, "
                             "or drop it for the prototypes")
        return _prototype_index(run_dir, model, meta, seed)
    metric = meta["config"].get("metric", DEFAULT_METRIC)
    if margin_eps is not None and not distance_named(metric).certifiable:
        raise DundiError(f"{run_dir} ranks by {metric} distance: oracles chosen for certified margin "
                         f"need a certified run (dundi train --certified); build without --select-eps")
    images, labels, ids = run_rows(meta, *load_split(meta["dataset"], "train", data_dir,
                                                     limit=meta["config"].get("limit")), trained=True)
    if margin_eps is None and meta.get("prototypes"):
        from dundi.robustness.margin_oracles import prototype_oracles

        pick = prototype_oracles(model, images, labels, n, meta["num_classes"], seed)
        how = {"select": "prototypes"}
    elif margin_eps is None:
        pick, how = OracleIndex.select(labels, n, seed, meta["num_classes"]), {}
    else:
        from dundi.robustness.margin_oracles import margin_oracles

        pick = margin_oracles(model, images, labels, n, meta["num_classes"], margin_eps, seed, **margin_fit)
        how = {"select": "margin", "select_eps": margin_eps}
    classes = meta.get("dataset_classes", list(range(meta["num_classes"])))
    index = OracleIndex(forward_batched(model, images[pick]), meta["num_classes"],
                        class_names=list(dataset_class_names(meta)), metric=metric,
                        meta={"seed": seed, "dataset": meta["dataset"], "split": "train",
                              "ids": ids[pick].tolist(), "dataset_classes": classes, **how})
    save_oracle(run_dir, index)
    return index


def _prototype_index(run_dir: str | os.PathLike, model: nn.Module, meta: dict, seed: int) -> OracleIndex:
    """The index of a prototype run's learned prototypes (two vectors per class), saved."""
    if not meta.get("prototypes") or model.prototype_head() is None:
        raise DundiError(f"{run_dir} has no learned prototypes: --oracle-kind prototypes needs a run "
                         f"trained with --certified --cert-head prototypes")
    from dundi.robustness.margin_oracles import prototype_vectors

    classes = meta.get("dataset_classes", list(range(meta["num_classes"])))
    index = OracleIndex(prototype_vectors(model, seed), meta["num_classes"],
                        class_names=list(dataset_class_names(meta)), metric=SQEUCLIDEAN.name,
                        meta={"seed": seed, "dataset": meta["dataset"], "select": "prototypes-as-oracles",
                              "dataset_classes": classes})
    save_oracle(run_dir, index)
    return index


def classify_split(run_dir: str | os.PathLike, rule: TwoStepRule | None = None, split: str = "test",
                   data_dir: str | None = None, limit: int | None = None, radii: bool = False) -> dict:
    """Two-step accuracy of a DunDi run under ``rule`` on a dataset split (or native accuracy for
    a native run). The rule's m defaults to min(3, n), the paper's setting, so n = 1 (Table 1)
    needs no extra flag."""
    run = Run.load(run_dir)
    images, labels, _ = run_rows(run.meta, *load_split(run.meta["dataset"], split, data_dir, limit=limit))
    figures = {"dataset": run.meta["dataset"], "split": split, "count": int(len(labels)),
               "run": str(run_dir), "kind": run.meta["kind"]}
    if run.oracle is None:
        return {**figures, "accuracy": native_accuracy(run.model, images, labels)}
    rule = run.oracle.resolve(rule)
    result = run.classify(images, rule)
    figures = {**figures, "accuracy": accuracy(result.labels, labels), "n": rule.n, "m": rule.m, "k": rule.k}
    if radii:  # per image: how far the input may move before the rule's answer can change
        radius = run.certifier(rule).batched(images, result.labels, radius=True)["radius"]
        figures.update(labels=result.labels.tolist(), certified_radius=(np.floor(radius * 1e6) / 1e6).tolist(),
                       median_certified_radius=float(np.median(radius)))
    return figures


def certify_split(run_dir: str | os.PathLike, eps: list[float], rule: TwoStepRule | None = None,
                  split: str = "test", data_dir: str | None = None, limit: int | None = None,
                  verifier: str = DEFAULT_VERIFIER) -> dict:
    """Clean and certified accuracy of a run's deployed ``rule`` on a split: an image
    counts as certified at eps when the rule answers its true label for every input in the
    L∞ ball (dundi.robustness.certificate), proven by ``verifier`` (dundi.robustness.verifiers).
    Also the median certified radius of the correct answers."""
    for e in eps:
        if not 0 < e <= 1:
            raise DundiError(f"--eps {e} is outside (0, 1]: L-inf radii are on [0, 1] pixels")
    run = Run.load(run_dir)
    images, labels, _ = run_rows(run.meta, *load_split(run.meta["dataset"], split, data_dir, limit=limit))
    native = run.meta["kind"] == "native"
    rule = rule if native else run.oracle.resolve(rule)  # asked once, for answers and proofs
    certifier = run.certifier(rule, verifier)
    t0 = time.time()
    answers = run.classify(images, rule).labels
    certified = certifier.batched(images, labels, eps=list(eps))["certified"]
    correct = answers == labels
    if (certified & ~correct[:, None]).any():  # a certificate at eps implies the right answer at 0
        raise DundiError("internal error: a certified image is misclassified by the served rule; "
                         "please report it with the run")
    figures = {"dataset": run.meta["dataset"], "split": split, "count": int(len(labels)),
               "run": Path(run_dir).name, "kind": run.meta["kind"], "verifier": verifier}
    if native:
        figures["rule"] = "argmax of the logits"
    else:
        figures.update(n=rule.n, m=rule.m, k=rule.k, metric=rule.metric, step1=run.oracle.step1_kind(rule))
    figures.update(clean_accuracy=accuracy(answers, labels),
                   certified_accuracy={f"{e:g}": float(certified[:, i].mean()) for i, e in enumerate(eps)})
    if not native:
        figures.update(_served_certified(run, certifier, images, labels, eps, rule))
    return {**figures, "seconds": round(time.time() - t0, 2)}


def _served_certified(run: Run, certifier, images: np.ndarray, labels: np.ndarray, eps: list[float],
                      rule: ResolvedRule) -> dict:
    """With the abstain rule `dundi index calibrate` stored for this rule: the share of
    images the service answers correctly with a certificate that covers the abstain gate too
    (no input of the ball is answered otherwise or withdrawn as "unknown")."""
    from dundi.robustness.certificate import AbstainGate
    from dundi.rule.abstain_signals import CERTIFIED_SIGNALS
    stored = stored_calibration(run.meta, rule, index_sha256(run.meta))
    if not stored:
        return {}
    # the signals the certificate does not bound are served outside the radius, by name
    gate = AbstainGate(**{f: v for f, v in stored["thresholds"].items() if f in CERTIFIED_SIGNALS})
    served = certifier.batched(images, labels, eps=list(eps), gate=gate)["certified"]
    return {"served_certified_accuracy": {f"{e:g}": float(served[:, i].mean()) for i, e in enumerate(eps)},
            "abstain_rule": f"calibrated at {stored['rate']:.0%} false abstains ({stored['source']})"}


def held_out_images(run: Run, data_dir: str | None = None, limit: int | None = CALIBRATION_LIMIT
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, description) of in-distribution images the run's model did not train on
    (what the abstain rule is calibrated on):
    the validation part of the train split, split as training split it (after leaving out
    any held-out classes), minus the oracles. Never the test split: a threshold fitted on it
    would leave no untouched data to measure the false-abstain rate on."""
    meta = run.meta
    cfg = meta.get("config", {})
    images, labels, ids = run_rows(meta, *load_split(meta["dataset"], "train", data_dir, limit=cfg.get("limit")))
    _, va = split_train_val(labels, cfg.get("val_fraction", 0.0), cfg.get("seed", 0))
    oracle_ids = set(run.oracle.meta.get("ids", [])) if run.oracle else set()
    va = np.array([i for i in va if int(ids[i]) not in oracle_ids], dtype=np.int64)
    if not len(va):
        raise DundiError(f"{run.path} was trained without a validation part (--val-fraction 0), so no "
                         f"held-out images are left to calibrate abstaining on: retrain with --val-fraction "
                         f"0.1, or serve with --abstain-threshold none (or a nearest-oracle distance)")
    source = f"{meta['dataset']} train split, validation part held out by training ({len(va)} images)"
    if limit is not None and len(va) > limit:
        va = np.sort(np.random.default_rng(0).choice(va, limit, replace=False))
    return images[va], labels[va], source

