"""Evaluating one shard of an evaluation: its attack on its slice of samples, into rows.

Evaluating a shard:

1. build the threat model's target (:mod:`dundi.robustness.threats`) and the attack on it from
   the shard's :class:`~dundi.evaluation.plan.AttackPlan` (seeded per setting, each sample
   drawing from its own stream, so a rerun or another layout gives the same rows);
2. run the attack on the shard's clean images;
3. classify clean and adversarial images with the native model (argmax of the logits), with
   DunDi's two-step rule at the evaluation's (n, m, k) and at every n of ``n_values``, and
   with the attacked target model;
4. measure the perturbation (L0, L2, Linf), the pixel range and the gradient norm of the
   target model's loss at the clean input (zero gradients mean masking, see
   :func:`dundi.evaluation.summary.checks`).

One row per sample (:data:`dundi.evaluation.results.SCHEMA`). Defense success is DunDi's
two-step label on the adversarial input equal to the true label; attack success is the
*target* model's label on it differing from the true label.

On a GPU (``EvalConfig.device``) the networks, the stand-ins and the attacks run there; the
oracle index answers as it always does (:mod:`dundi.rule.search`: FAISS on the GPU where its
build has GPU support). Its search uses no ID selectors, which FAISS GPU indexes ignore: step 2
reads each kept class's contiguous rows, so the GPU search gives the CPU's answers. Rows are
the same bits in any layout on one device; GPU kernels are not the CPU's, so a GPU
evaluation's attacks may end elsewhere than a CPU one's.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dundi.errors import DundiError
from dundi.evaluation.config import EvalConfig, resolve_device
from dundi.evaluation.plan import (
    ShardSpec,
    attack_params,
    attack_settings_id,
    attack_steps,
    plan_attacks,
    plan_key,
    select_samples,
    setting_seed,
)
from dundi.evaluation.results import L0_TOL, SCHEMA
from dundi.nets.inference import forward_batched
from dundi.nets.invariant import invariant
from dundi.robustness.threats import build_threat
from dundi.run.directory import Run

Samples = tuple[np.ndarray, np.ndarray, np.ndarray]


class Evaluator:
    """Loads both runs and the evaluated samples once, plans the attacks once, then evaluates
    shards. A plain class so a Ray worker can keep one per process
    (see dundi.distributed.evaluate_job). ``data``/``meta``: the samples and run.json a caller
    already holds (not read again)."""

    def __init__(self, cfg: EvalConfig, run_dir: str | None = None, native_dir: str | None = None,
                 data: Samples | None = None, meta: dict | None = None):
        self.cfg = cfg
        self.device = torch.device(resolve_device(cfg.device))
        self.run = Run.load(run_dir or cfg.run)
        native_dir = native_dir or cfg.native
        self.native = Run.load(native_dir, with_oracle=False) if native_dir else None
        self.dataset = self.run.meta["dataset"]
        index = self.run.oracle
        self.rule = index.resolve(cfg.rule)  # asked once; threats, stand-ins and judges take it
        self.n = self.rule.n
        self.n_values = [v for v in cfg.n_values if v <= index.n] or [self.n]
        self._rules = {**{v: index.resolve(cfg.rule.at_n(v)) for v in self.n_values}, self.n: self.rule}
        if data is None:
            data = self.load_samples(cfg, self.dataset, meta or self.run.meta)
        self.images, self.labels, self.ids = data
        self.plans = {plan_key(p): p for p in plan_attacks(cfg, self.dataset)}
        self.oracles = self.run.oracle_tensor(self.n).to(self.device)
        self._threats: dict[str, Any] = {}
        self._lock = threading.Lock()
        # Batch-invariant forward passes (dundi.nets.invariant): a row's embedding and native
        # logits are the same bits in a shard of any size, at any thread count. For a run
        # ranking by squared Euclidean distance they are Run.embed's bits, the served path's.
        self._dundi_net = invariant(self.run.model.to(self.device))
        self._native_net = invariant(self.native.model.to(self.device) if self.native else None)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embeddings whose every row is the same bits in any shard (see __init__)."""
        return forward_batched(self._dundi_net, images)

    @staticmethod
    def load_samples(cfg: EvalConfig, dataset: str, meta: dict | None = None) -> Samples:
        """The evaluated samples of the split, by the run's run.json ``meta`` (read when not
        given): a run with held-out or enrolled classes answers with its index's labels."""
        from dundi.data import load_split
        from dundi.run.pipeline import run_rows
        from dundi.run.storage import read_meta

        meta = meta if meta is not None else read_meta(cfg.run)

        images, labels, ids = run_rows(meta, *load_split(dataset, cfg.split, cfg.data_dir))
        pos = select_samples(len(labels), cfg.limit, cfg.seed)
        return images[pos], labels[pos], ids[pos]

    def warm_up(self) -> None:
        """One forward pass of every model on two samples, and one Arrow array from Python
        objects: torch builds its kernels' state on the first call and pyarrow imports pandas
        on its first conversion (half a second in a fresh Ray worker, seen with py-spy), which
        would otherwise land on the first shard's clock."""
        pa.array(["warm-up"])
        x_np = np.array(self.images[:2], dtype=np.float32)
        with torch.no_grad():
            self.embed(x_np)
            if self.native is not None:
                forward_batched(self._native_net, x_np)

    def threat(self, name: str):
        with self._lock:  # shards of one process may run in threads (evaluate_local)
            if name not in self._threats:
                self._threats[name] = build_threat(
                    name, native=self.native.model if self.native else None, distance_net=self.run.model,
                    oracles=self.oracles, temperature=self.cfg.temperature, nearest=self.cfg.nearest,
                    rule=self.rule, judge=self._judge, counts=self.run.oracle.class_counts())
                self._threats[name].model.to(self.device)
            return self._threats[name]

    def _judge(self, emb: torch.Tensor) -> torch.Tensor:
        """The deployed rule (the index, under the evaluation's rule) on embeddings from the
        stand-in; on the stand-in's device."""
        labels = self._two_step(emb.detach().cpu().float().numpy(), self.n)
        return torch.from_numpy(labels).to(emb.device)

    def _two_step(self, emb: np.ndarray, n: int) -> np.ndarray:
        return self.run.oracle.classify(emb, self._rules[n]).labels

    def evaluate_shard(self, spec: ShardSpec) -> pa.Table:
        cfg = self.cfg
        plan = self.plans.get(spec.plan_key)
        if plan is None:
            raise DundiError(f"shard {spec.name} belongs to no attack this evaluation plans")
        # copies: arrays from Ray's object store are read-only, torch wants writable memory
        x_np = np.array(self.images[spec.start:spec.stop], dtype=np.float32)
        y_np = np.array(self.labels[spec.start:spec.stop], dtype=np.int64)
        x, y = torch.from_numpy(x_np).to(self.device), torch.from_numpy(y_np).to(self.device)
        threat = self.threat(spec.threat)
        attack = plan.build(threat.model, setting_seed(cfg, spec))
        if attack_settings_id(attack) != spec.settings:
            raise DundiError(f"{spec.attack} was built with other settings than shard {spec.name} "
                             f"records ({attack_params(attack)})")
        keys = torch.tensor(np.asarray(self.ids[spec.start:spec.stop], np.int64))
        result = attack.run(x, y, keys=keys.to(self.device))
        adv = result.adv.detach().float()
        steps_used = result.steps.detach().cpu().to(torch.int64).reshape(-1)
        if steps_used.numel() == 1 and len(y) > 1:
            steps_used = steps_used.expand(len(y))
        adv_np = adv.cpu().numpy()

        grad_norm = self._grad_norm(threat.model, x, y, getattr(attack, "loss", "ce"))
        diff = (adv_np.astype(np.float64) - x_np.astype(np.float64)).reshape(len(y), -1)
        with torch.no_grad():
            target_clean = threat.model(x).argmax(1).cpu().numpy()
            target_adv = threat.model(adv).argmax(1).cpu().numpy()
        if self.native is not None:
            native_clean = forward_batched(self._native_net, x_np).argmax(1)
            native_adv = forward_batched(self._native_net, adv_np).argmax(1)
        else:
            native_clean = native_adv = np.full(len(y), -1)
        emb_clean, emb_adv = self.embed(x_np), self.embed(adv_np)
        dundi_clean, dundi_adv = self._two_step(emb_clean, self.n), self._two_step(emb_adv, self.n)
        at_n_clean = np.stack([self._two_step(emb_clean, v) for v in self.n_values], 1)
        at_n_adv = np.stack([self._two_step(emb_adv, v) for v in self.n_values], 1)

        rows = len(y)
        params = json.dumps({**attack_params(attack), "threat_target": threat.target,
                             "temperature": cfg.temperature}, sort_keys=True, default=str)
        columns = {
            "sample_id": self.ids[spec.start:spec.stop], "position": np.arange(spec.start, spec.stop),
            "attack": [spec.attack_label] * rows, "eps": np.full(rows, spec.eps), "threat": [spec.threat] * rows,
            "dataset": [self.dataset] * rows, "split": [cfg.split] * rows, "label": y_np,
            "norm": [norm_label(getattr(attack, "norm", "?"))] * rows,
            "steps": np.full(rows, attack_steps(attack, x_np[0].size if rows else 0)), "steps_used": steps_used.numpy(),
            "attack_params": [params] * rows, "target_model": [threat.target] * rows,
            "native_clean": native_clean, "native_adv": native_adv,
            "dundi_clean": dundi_clean, "dundi_adv": dundi_adv,
            "target_clean": target_clean, "target_adv": target_adv,
            "n": np.full(rows, self.n), "m": np.full(rows, self.rule.m), "k": np.full(rows, self.rule.k),
            "n_values": [list(self.n_values)] * rows,
            "dundi_clean_at_n": at_n_clean.tolist(), "dundi_adv_at_n": at_n_adv.tolist(),
            "l0": (np.abs(diff) > L0_TOL).sum(1), "l2": np.sqrt((diff ** 2).sum(1)),
            "linf": np.abs(diff).max(1) if diff.size else np.zeros(rows),
            "adv_min": adv_np.reshape(rows, -1).min(1), "adv_max": adv_np.reshape(rows, -1).max(1),
            "grad_norm": grad_norm,
            "target_class": (result.target.cpu().numpy() if result.target is not None
                             else np.full(rows, -1)),
            "attack_success": target_adv != y_np, "defense_success": dundi_adv == y_np,
            "adv": ([a.astype(np.float32).tobytes() for a in adv_np] if cfg.save_adv else [None] * rows),
        }
        return pa.Table.from_pydict({f.name: pa.array(columns[f.name], f.type) for f in SCHEMA}, schema=SCHEMA)

    @staticmethod
    def _grad_norm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> np.ndarray:
        """Per-sample ‖∇x loss(model(x), y)‖₂ at the clean input, for the loss the attack
        climbs (JSMA and DeepFool, which have none, are checked with cross-entropy)."""
        from dundi.attacks.base import input_grad

        grad, _ = input_grad(model, x, y, loss if loss in ("ce", "margin") else "ce")
        return grad.flatten(1).norm(dim=1).double().cpu().numpy()


def norm_label(norm: str) -> str:
    return {"linf": "Linf", "l2": "L2", "l0": "L0"}.get(str(norm).lower(), str(norm))


def adv_images(table: pa.Table, shape: tuple[int, ...]) -> np.ndarray:
    """The saved adversarial images of result rows (``save_adv``) as (N, *shape) float32."""
    blobs = table.column("adv").to_pylist()
    if any(b is None for b in blobs):
        raise DundiError("these results were written without --save-adv")
    return np.stack([np.frombuffer(b, np.float32).reshape(shape) for b in blobs])


__all__ = ["Evaluator", "norm_label", "adv_images"]
