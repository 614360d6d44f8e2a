"""Adversarial evaluation of one DunDi run, shard by shard, without Ray.

An evaluation is a grid (attack × eps × threat model) over a seeded sample of a test split,
cut into shards of ``shard_size`` samples. Evaluating a shard:

1. build the threat model's target (:mod:`dundi.robustness.threats`) and the attack on it
   (:func:`dundi.attacks.make_attack`, seeded per shard so a rerun gives the same rows);
2. run the attack on the shard's clean images;
3. classify clean and adversarial images with the native model (argmax of the logits), with
   DunDi's two-step rule at the evaluation's (n, m, k) and at every n of ``n_values``, and
   with the attacked target model;
4. measure the perturbation (L0, L2, Linf), the pixel range and the gradient norm of the
   target model's loss at the clean input (zero gradients mean masking, see
   :func:`dundi.evaluation.results.checks`).

It returns one row per sample (:data:`dundi.evaluation.results.SCHEMA`). :func:`prepare` plans the shards
and writes ``evaluation.json``; :func:`evaluate_local` runs the unfinished shards in this
process; ``dundi.distributed.evaluate_job`` runs them on Ray worker actors. Both write each shard
atomically, so a killed evaluation restarts where it stopped.

Defense success is DunDi's two-step label on the adversarial input equal to the true label;
attack success is the *target* model's label on it differing from the true label.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from dundi.errors import DundiError
from dundi.evaluation.config import PAPER_ATTACKS, EvalConfig  # noqa: F401 (PAPER_ATTACKS: re-exported)
from dundi.evaluation.results import (
    EVALUATION_FILE,
    L0_TOL,
    SCHEMA,
    finished_shards,
    read_evaluation,
    record_timing,
    shard_name,
    write_shard,
)
from dundi.files import atomic_write_json
from dundi.nets.inference import forward_batched
from dundi.nets.invariant import invariant
from dundi.robustness.threats import build_threat
from dundi.run.directory import Run
from dundi.run.storage import load_oracle, read_meta

FORMAT_VERSION = 3  # 3: per-sample random streams, batch-invariant stand-ins (rows independent of
                    # the layout); 2: ``adaptive`` attacks the exact two-step stand-in
# The paper's settings where they differ from the attacks' MNIST defaults (DESIGN.md §1).
DATASET_DEFAULTS: dict[str, dict[str, float]] = {"cifar10": {"eps": 0.05, "alpha": 0.005}}
# Attacks on DunDi's distance scores use the CW margin unless told otherwise: summed embedding
# distances are large, so softmax cross-entropy saturates in float32 and its gradient is exactly
# zero for most samples (seen on DunDi_R3: 74% of samples), which would understate the attack.
THREAT_DEFAULTS: dict[str, dict[str, str]] = {"adaptive": {"loss": "margin"}, "adaptive-all": {"loss": "margin"},
                                               "feature": {"loss": "margin"}}


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    attack: str
    eps: float          # the attack's budget; inf for unbounded minimal-perturbation attacks
    threat: str
    start: int          # range of the evaluation's sample list
    stop: int
    settings: str = ""  # hash of the attack's other settings (see attack_settings_id)
    label: str = ""     # the attack's name in the rows: its registry name + explicit settings

    @property
    def attack_label(self) -> str:
        return self.label or self.attack

    @property
    def name(self) -> str:
        return shard_name(self.attack, self.eps, self.threat, self.start, self.stop, self.settings)


def _constructor_defaults(name: str) -> dict[str, Any]:
    """Keyword → default of an attack's settings, as the attack declares them."""
    from dundi.attacks import ATTACKS

    return ATTACKS[name].options()


# ---- planning --------------------------------------------------------------------------------

def _attack_kwargs(cfg: EvalConfig, dataset: str, threat: str) -> dict[str, Any]:
    return {**DATASET_DEFAULTS.get(dataset, {}), **THREAT_DEFAULTS.get(threat, {}), **cfg.attack_kw}


def _accepted(name: str, kw: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments the attack takes (its declared options)."""
    options = _constructor_defaults(name)
    return {k: v for k, v in kw.items() if k in options}


def make_attack_for(name: str, model: torch.nn.Module, eps: float | None, cfg: EvalConfig,
                    dataset: str, seed: int, threat: str = "transfer"):
    """The attack with the evaluation's settings. ``eps`` only reaches attacks with an eps
    budget (make_attack ignores it for JSMA and DeepFool); keyword arguments an attack does not
    take (e.g. alpha for FGSM) are dropped, so one --attack-arg can serve several attacks.
    Defaults come from the dataset, then the threat model (:data:`THREAT_DEFAULTS`), then
    ``--attack-arg``, the last winning."""
    from dundi.attacks import make_attack

    kw = _attack_kwargs(cfg, dataset, threat)
    default_eps = kw.pop("eps", None)
    if eps is None or math.isinf(eps):
        eps = default_eps
    kw = _accepted(name, kw)
    kw.pop("seed", None)
    try:
        return make_attack(name, model, eps=eps, steps=cfg.steps, seed=seed, **kw)
    except (ValueError, TypeError) as exc:  # an attack's own check on a setting's value
        raise DundiError(f"{name}: {exc}") from None


def attack_label(name: str, cfg: EvalConfig) -> str:
    """The name an attack's rows carry: its registry name, plus the settings this call gave it
    explicitly (``--steps``, ``--attack-arg``) that it takes, e.g. ``pgd[loss=margin,steps=100]``.
    Variants of one attack at one eps (CE and margin, 40 and 1,000 steps) are then separate
    rows, compared side by side and combined in the worst case."""
    from dundi.attacks import ATTACKS

    given = {k: v for k, v in _accepted(name, cfg.attack_kw).items() if k not in ("eps", "seed")}
    if cfg.steps is not None and ATTACKS[name].steps_arg:
        given["steps"] = cfg.steps
    if not given:
        return name
    return f"{name}[{','.join(f'{k}={v}' for k, v in sorted(given.items()))}]"


def attack_eps(attack) -> float:
    """The budget an attack object enforces, in its norm (:attr:`Attack.budget`): eps for Linf /
    L2 attacks, gamma — the largest fraction of pixels changed — for JSMA (L0), inf for
    unbounded DeepFool."""
    return attack.budget


def attack_params(attack) -> dict[str, Any]:
    """Every plain setting of an attack object, for the rows and the report."""
    out = {"class": type(attack).__name__}
    for key, value in vars(attack).items():
        if key.startswith("_") or key in ("model", "device"):
            continue
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
            out[key] = list(value)
    return out


def attack_steps(attack, num_features: int) -> int:
    """Configured iterations, as the attack declares them (:meth:`Attack.configured_steps`):
    steps / max_iter / n_queries; JSMA's largest number of pixel-pair updates; 1 for FGSM."""
    return attack.configured_steps(num_features)


def resolve_eps(cfg: EvalConfig, dataset: str) -> dict[str, list[float]]:
    """Per attack, the budgets to evaluate: --eps for attacks with an eps budget (Linf / L2),
    else the attack's own (JSMA: gamma; DeepFool: inf)."""
    out = {}
    for name in cfg.attacks:
        default = make_attack_for(name, torch.nn.Identity(), None, cfg, dataset, 0)
        if cfg.eps is None or type(default).budget_arg != "eps":
            out[name] = [attack_eps(default)]
        else:
            out[name] = [float(e) for e in cfg.eps]
    return out


def select_samples(count: int, limit: int | None, seed: int) -> np.ndarray:
    """Positions in the split to evaluate: a seeded permutation, cut at ``limit``. Test splits
    are often sorted by class, so a prefix would not do; a permutation prefix keeps the first
    shards of a larger evaluation identical to those of a smaller one."""
    order = np.random.default_rng(seed).permutation(count)
    return order if limit is None else order[: min(limit, count)]


def attack_settings_id(attack) -> str:
    """Short hash of every setting of an attack object except its seed (seeds are per shard)."""
    params = {k: v for k, v in attack_params(attack).items() if k != "seed"}
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]


def plan_shards(cfg: EvalConfig, num_samples: int, eps: dict[str, list[float]],
                dataset: str = "") -> list[ShardSpec]:
    specs = []
    for threat in cfg.threats:
        for attack in cfg.attacks:
            for e in eps[attack]:
                probe = make_attack_for(attack, torch.nn.Identity(), e, cfg, dataset, 0, threat)
                sid, label = attack_settings_id(probe), attack_label(attack, cfg)
                for start in range(0, num_samples, cfg.shard_size):
                    stop = min(start + cfg.shard_size, num_samples)
                    specs.append(ShardSpec(attack, e, threat, start, stop, sid, label))
    return specs


def fingerprint(cfg: EvalConfig) -> str:
    """Identity of the evaluation: both runs' weights and oracle index (by sha256), the sample
    seed, the two-step and threat-model settings. The grid, the sample count and the attack
    settings are not part of it: they name shards (see :func:`plan_shards`)."""
    meta = read_meta(cfg.run)
    native_meta = read_meta(cfg.native) if cfg.native else {}
    ident = {
        "version": FORMAT_VERSION,
        "dundi_files": meta.get("files", {}),
        "native_files": native_meta.get("files", {}),
        **{k: v for k, v in dataclasses.asdict(cfg).items()
           if k not in ("run", "native", "attacks", "threats", "eps", "limit", "data_dir", "steps",
                        "attack_kw")},
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_info(run_dir: str | None) -> dict[str, Any]:
    if not run_dir:
        return {}
    meta = read_meta(run_dir)
    cfg = meta.get("config", {})
    info = {"path": str(run_dir), "kind": meta.get("kind"), "arch": meta.get("arch"),
            "dataset": meta.get("dataset"), "mode": meta.get("mode"), "tuples": cfg.get("tuples"),
            "epochs": cfg.get("epochs"), "limit": cfg.get("limit"), "loss": cfg.get("loss"),
            "adversarial": bool(cfg.get("adversarial")),
            "adv_eps": cfg.get("adv_eps") if cfg.get("adversarial") else None}
    info["name"] = model_name(info)
    return info


_PAPER_INDEX = {"lenet1": "1", "lenet4": "2", "lenet5": "3", "vgg16": ""}


def model_name(info: dict[str, Any]) -> str:
    """The paper's naming: DunDi_R3 is a retrained LeNet-5 Distance NN, Native Model3 LeNet-5;
    adversarially trained runs are DunDi-AT_R3 and Madry-AT Model3."""
    idx = _PAPER_INDEX.get(info.get("arch") or "", f" ({info.get('arch')})")
    if info.get("kind") == "dundi":
        return f"DunDi{'-AT' if info.get('adversarial') else ''}_{info.get('mode') or 'R'}{idx}"
    prefix = "Madry-AT" if info.get("adversarial") else "Native"
    return f"{prefix} Model{idx}" if idx else f"{prefix} Model"


def prepare(cfg: EvalConfig, out: str | os.PathLike) -> tuple[dict, list[ShardSpec], list[ShardSpec]]:
    """Plan the evaluation, write ``evaluation.json`` and return (evaluation, plan, todo):
    ``plan`` is this call's shards, ``todo`` those of them not finished yet.

    Refuses an output directory holding an evaluation with another fingerprint (other
    weights or settings): its finished shards would not be comparable."""
    meta = read_meta(cfg.run)  # first: a missing run is the mistake to report, not a missing --native
    cfg.validate()
    out = Path(out)
    if meta.get("kind") != "dundi":
        raise DundiError(f"{cfg.run} is a {meta.get('kind')} run: `dundi evaluate` takes a DunDi run "
                         f"(pass the native run with --native)")
    dataset = meta["dataset"]
    index = load_oracle(cfg.run, meta)  # fail here, not in a Ray worker, on a bad n / m / k
    index.resolve(cfg.rule)
    if cfg.native and read_meta(cfg.native).get("dataset") != dataset:
        raise DundiError(f"--native {cfg.native} was trained on {read_meta(cfg.native).get('dataset')}, "
                         f"the DunDi run on {dataset}")
    fp = fingerprint(cfg)
    old: dict = {}
    if (out / EVALUATION_FILE).exists():
        old = read_evaluation(out)
        if old.get("fingerprint") != fp:
            raise DundiError(f"{out} holds an evaluation with other weights or settings "
                             f"(fingerprint {old.get('fingerprint')} ≠ {fp}); use another --out")
    from dundi.data import load_split
    from dundi.run.pipeline import run_rows

    _, labels, _ = run_rows(meta, *load_split(dataset, cfg.split, cfg.data_dir))
    positions = select_samples(len(labels), cfg.limit, cfg.seed)
    eps = resolve_eps(cfg, dataset)
    plan = plan_shards(cfg, len(positions), eps, dataset)
    # The directory accumulates (threat, attack label, eps) settings: shards of settings this
    # call does not evaluate stay in the plan; a setting evaluated again is re-planned (a
    # changed --limit must not leave two shards covering one sample).
    settings = {(s.threat, s.attack_label, s.eps) for s in plan}
    kept = [ShardSpec(**old["shards"][name]) for name in old.get("plan", [])]
    kept = [s for s in kept if (s.threat, s.attack_label, s.eps) not in settings]
    full = kept + plan
    evaluation = {
        "format_version": FORMAT_VERSION, "fingerprint": fp, "dataset": dataset, "split": cfg.split,
        "samples": int(len(positions)), "split_size": int(len(labels)),
        "config": dataclasses.asdict(cfg), "eps": eps,
        "model": _model_info(cfg.run), "native": _model_info(cfg.native),
        "plan": [s.name for s in full], "shards": {s.name: dataclasses.asdict(s) for s in full},
    }
    atomic_write_json(out / EVALUATION_FILE, evaluation)
    done = finished_shards(out, fp)
    todo = [s for s in plan if s.name not in done]
    return evaluation, plan, todo


def setting_seed(cfg: EvalConfig, spec: ShardSpec) -> int:
    """The attack's seed for one (threat, attack setting, eps): the same for every shard of it.
    Each sample then draws from its own stream keyed by its sample id
    (:mod:`dundi.attacks.draws`), so its random start and proposals do not depend on the shard
    it falls in (a seed per shard made shard size change every row's attack)."""
    ident = f"{cfg.seed}:{spec.threat}:{spec.attack_label}:{spec.eps!r}:{spec.settings}"
    return int(hashlib.sha256(ident.encode()).hexdigest()[:8], 16)


# ---- evaluating a shard ------------------------------------------------------------------------

class Evaluator:
    """Loads both runs and the evaluated samples once, then evaluates shards. A plain class so
    a Ray worker can keep one per process (see dundi.distributed.evaluate_job)."""

    def __init__(self, cfg: EvalConfig, run_dir: str | None = None, native_dir: str | None = None,
                 data: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None):
        self.cfg = cfg
        self.run = Run.load(run_dir or cfg.run)
        self.native = Run.load(native_dir or cfg.native, with_oracle=False) if (native_dir or cfg.native) else None
        self.dataset = self.run.meta["dataset"]
        index = self.run.oracle
        self.rule = index.resolve(cfg.rule)  # asked once; threats, stand-ins and judges take it
        self.n = self.rule.n
        self.n_values = [v for v in cfg.n_values if v <= index.n] or [self.n]
        self._rules = {**{v: index.resolve(cfg.rule.at_n(v)) for v in self.n_values}, self.n: self.rule}
        if data is None:
            data = self.load_samples(cfg, self.dataset)
        self.images, self.labels, self.ids = data
        self.oracles = self.run.oracle_tensor(self.n)
        self._threats: dict[str, Any] = {}
        self._lock = threading.Lock()
        # Batch-invariant forward passes (dundi.nets.invariant): a row's embedding and native
        # logits are the same bits in a shard of any size, at any thread count. For a run
        # ranking by squared Euclidean distance they are Run.embed's bits, the served path's.
        self._dundi_net = invariant(self.run.model)
        self._native_net = invariant(self.native.model if self.native else None)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embeddings whose every row is the same bits in any shard (see __init__)."""
        return forward_batched(self._dundi_net, images)

    @staticmethod
    def load_samples(cfg: EvalConfig, dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from dundi.data import load_split
        from dundi.run.pipeline import run_rows

        # a run with held-out or enrolled classes answers with its index's labels
        images, labels, ids = run_rows(read_meta(cfg.run), *load_split(dataset, cfg.split, cfg.data_dir))
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
            return self._threat(name)

    def _threat(self, name: str):
        if name not in self._threats:
            self._threats[name] = build_threat(
                name, native=self.native.model if self.native else None, distance_net=self.run.model,
                oracles=self.oracles, temperature=self.cfg.temperature, nearest=self.cfg.nearest,
                rule=self.rule, judge=self._judge, counts=self.run.oracle.class_counts())
        return self._threats[name]

    def _judge(self, emb: torch.Tensor) -> torch.Tensor:
        """The deployed rule (the index, under the evaluation's rule) on embeddings from the stand-in."""
        return torch.from_numpy(self._two_step(emb.detach().cpu().float().numpy(), self.n))

    def _two_step(self, emb: np.ndarray, n: int) -> np.ndarray:
        return self.run.oracle.classify(emb, self._rules[n]).labels

    def evaluate_shard(self, spec: ShardSpec) -> pa.Table:
        cfg = self.cfg
        # copies: arrays from Ray's object store are read-only, torch wants writable memory
        x_np = np.array(self.images[spec.start:spec.stop], dtype=np.float32)
        y_np = np.array(self.labels[spec.start:spec.stop], dtype=np.int64)
        x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
        threat = self.threat(spec.threat)
        seed = setting_seed(cfg, spec)
        attack = make_attack_for(spec.attack, threat.model, spec.eps, cfg, self.dataset, seed, spec.threat)
        if attack_eps(attack) != spec.eps or (spec.settings and attack_settings_id(attack) != spec.settings):
            raise DundiError(f"{spec.attack} was built with other settings than shard {spec.name} "
                             f"records ({attack_params(attack)})")
        result = attack.run(x, y, keys=torch.tensor(np.asarray(self.ids[spec.start:spec.stop], np.int64)))
        adv = result.adv.detach().cpu().float()
        steps_used = result.steps.detach().cpu().to(torch.int64).reshape(-1)
        if steps_used.numel() == 1 and len(y) > 1:
            steps_used = steps_used.expand(len(y))
        adv_np = adv.numpy()

        grad_norm = self._grad_norm(threat.model, x, y, getattr(attack, "loss", "ce"))
        diff = (adv_np.astype(np.float64) - x_np.astype(np.float64)).reshape(len(y), -1)
        with torch.no_grad():
            target_clean = threat.model(x).argmax(1).numpy()
            target_adv = threat.model(adv).argmax(1).numpy()
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
        return grad.flatten(1).norm(dim=1).double().numpy()


def norm_label(norm: str) -> str:
    return {"linf": "Linf", "l2": "L2", "l0": "L0"}.get(str(norm).lower(), str(norm))


def adv_images(table: pa.Table, shape: tuple[int, ...]) -> np.ndarray:
    """The saved adversarial images of result rows (``save_adv``) as (N, *shape) float32."""
    blobs = table.column("adv").to_pylist()
    if any(b is None for b in blobs):
        raise DundiError("these results were written without --save-adv")
    return np.stack([np.frombuffer(b, np.float32).reshape(shape) for b in blobs])


def evaluate_local(cfg: EvalConfig, out: str | os.PathLike, progress: bool = True,
                   max_shards: int | None = None, log: Callable[[str], None] = print,
                   threads: int | None = 1) -> dict[str, Any]:
    """Run the unfinished shards of an evaluation in this process (no Ray); returns timing.

    ``threads``: shards evaluated at once, each in a thread of this process computing with one
    torch thread (None: one per core). Not torch's intra-op threads: a row's gradients are the
    same bits in any batch only at one torch thread (dundi.nets.invariant), and the rows must
    not depend on the layout; torch's kernels release the GIL, so concurrent shards use the
    cores instead. torch's thread setting is restored afterwards."""
    evaluation, plan, todo = prepare(cfg, out)
    log(f"evaluation {evaluation['fingerprint']}: {len(plan)} shards, "
        f"{len(plan) - len(todo)} already finished, {len(todo)} to run (in this process)")
    skipped = len(plan) - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    threads = max(1, min(threads or os.cpu_count() or 1, len(todo) or 1))
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if todo:
            evaluator = Evaluator(cfg)
            bar = _progress(sum(s.stop - s.start for s in todo), progress, evaluation)
            for spec, table in _concurrently(evaluator.evaluate_shard, todo, threads):
                write_shard(out, spec.name, table, evaluation["fingerprint"], rows=spec.stop - spec.start)
                bar.update(spec.stop - spec.start)
            bar.close()
    finally:
        torch.set_num_threads(before)
    timing = {"shards_run": len(todo), "shards_skipped": skipped, "rows": sum(s.stop - s.start for s in todo),
              "seconds": round(time.perf_counter() - t0, 3), "workers": 1,
              "cores": threads, "threads": threads, "mode": "local"}
    if todo:
        record_timing(out, timing)
    return timing


def _concurrently(fn: Callable[[ShardSpec], pa.Table], specs: list[ShardSpec], threads: int):
    """(spec, fn(spec)) for every spec as each finishes, ``threads`` at a time; in order and in
    this thread when ``threads`` is 1. An error in one shard is raised once the running ones end
    (every finished shard has been yielded, so it is written)."""
    if threads <= 1:
        for spec in specs:
            yield spec, fn(spec)
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    queue = list(specs)
    with ThreadPoolExecutor(threads, thread_name_prefix="dundi-shard") as pool:
        running = {}
        for spec in queue[:threads]:
            running[pool.submit(fn, spec)] = spec
        queue = queue[threads:]
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                spec = running.pop(future)
                table = future.result()
                if queue:
                    nxt = queue.pop(0)
                    running[pool.submit(fn, nxt)] = nxt
                yield spec, table


def _progress(total: int, enabled: bool, evaluation: dict | None = None):
    """Progress in image-attacks (one sample under one attack setting: a row), with rate and
    ETA: a bar on a terminal, a line every few percent or minute in a job's log (dundi.progress)."""
    from dundi.progress import counter

    desc = f"evaluation {evaluation['fingerprint'][:8]}" if evaluation else "evaluation"
    return counter(total, desc, "image-attack", enabled)


__all__ = ["EvalConfig", "ShardSpec", "Evaluator", "prepare", "plan_shards", "fingerprint",
           "evaluate_local", "select_samples", "model_name", "adv_images", "PAPER_ATTACKS"]
