"""The shared-source transfer protocol: one adversarial set, crafted once on a source model,
scored by every target run with the answer it serves.

The DunDi paper scores its models on "40,000 adversarial images for each dataset" made with the
code of Feinman et al. 2017, which crafts on its own CNN: one set, every model scored on it.
``dundi evaluate --threat transfer`` crafts on each DunDi run's *own* native model instead (for
DunDi_P that is its frozen backbone, close to white-box). This module runs the first protocol;
``dundi transfer`` is its command.

A transfer directory holds::

    transfer.json      the settings, the sample and, per target and attack, the figures
    sets/<label>.npz   per attack: the sample ids, labels and adversarial images (float32), the
                       attack's name in the rows and its eps; each
                       file written atomically and reused by a rerun with the same fingerprint
    rows.parquet       one row per (sample, attack, target)

The attacks are planned as ``dundi evaluate --threat transfer`` plans them (the same settings,
the same per-setting seed, a random stream per sample), so the set is the one an evaluation of
any DunDi run with ``--native SOURCE`` crafts; a test holds the two together. The sets are plain
``.npz`` arrays (read with ``allow_pickle=False``), so other tools can score them too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dundi.errors import DundiError
from dundi.evaluation.config import PAPER_ATTACKS, EvalConfig
from dundi.evaluation.plan import AttackPlan, ShardSpec, attack_params, plan_attacks, select_samples, setting_seed
from dundi.evaluation.results import repo_relative, wilson_interval
from dundi.files import atomic_write_json, sha256_file

TRANSFER_FILE = "transfer.json"
ROWS_FILE = "rows.parquet"
SET_DIR = "sets"

ROW_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("position", pa.int64()), ("label", pa.int64()),
    ("attack", pa.string()), ("eps", pa.float64()), ("target", pa.string()), ("target_kind", pa.string()),
    ("source_clean", pa.int64()), ("source_adv", pa.int64()),
    ("target_clean", pa.int64()), ("target_adv", pa.int64()), ("linf", pa.float64()), ("l0", pa.int64()),
])


@dataclasses.dataclass
class TransferConfig:
    """Everything that decides a shared-source transfer evaluation's sets and rows."""

    source: str                               # native run the attacks are crafted on
    targets: list[str]                        # runs scored on the set: DunDi (served rule) or native
    attacks: list[str] = dataclasses.field(default_factory=lambda: list(PAPER_ATTACKS))
    eps: list[float] | None = None            # None: each attack's own budget (paper settings)
    steps: int | None = None
    seed: int = 0                             # sample choice and per-setting attack seeds
    limit: int | None = None                  # this many samples of the split (None: all)
    split: str = "test"
    batch_size: int = 64                      # images per attack call (rows do not depend on it)
    attack_kw: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_dir: str | None = None

    def eval_config(self) -> EvalConfig:
        """The evaluation settings whose ``transfer`` plans craft this set (one home for the
        attacks' settings and seeds: :mod:`dundi.evaluation.plan`)."""
        return EvalConfig(run=self.source, native=self.source, attacks=list(self.attacks), threats=["transfer"],
                          eps=self.eps, steps=self.steps, seed=self.seed, limit=self.limit, split=self.split,
                          shard_size=self.batch_size, attack_kw=dict(self.attack_kw), data_dir=self.data_dir)

    def validate(self) -> None:
        if not self.targets:
            raise DundiError("a transfer evaluation needs at least one target run (--targets RUN ...)")
        self.eval_config().validate()


def _samples(cfg: TransferConfig, meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The evaluated samples, chosen as ``dundi evaluate`` chooses them (a seeded permutation)."""
    from dundi.data import load_split

    images, labels, ids = load_split(meta["dataset"], cfg.split, cfg.data_dir)
    pos = select_samples(len(labels), cfg.limit, cfg.seed)
    return np.asarray(images[pos], np.float32), np.asarray(labels[pos], np.int64), np.asarray(ids[pos], np.int64)


def _check_targets(source, targets: list) -> None:
    """Every target must answer in the source's label space on the source's images."""
    want = (source.meta["dataset"], tuple(source.meta["in_shape"]), tuple(source.class_names))
    for run in targets:
        got = (run.meta["dataset"], tuple(run.meta["in_shape"]), tuple(run.class_names))
        if got != want:
            raise DundiError(f"target {run.path} answers on {got[0]} with classes {', '.join(got[2])}; the "
                             f"source {source.path} on {want[0]} with {', '.join(want[2])}: score targets of "
                             f"the source's dataset and classes only")


def _fingerprint(cfg: TransferConfig, source_meta: dict, plan: AttackPlan) -> str:
    """Identity of one crafted set: the source's weights, the sample and the attack setting."""
    ident = {"source": source_meta.get("files", {}), "seed": cfg.seed, "limit": cfg.limit, "split": cfg.split,
             "attack": plan.name, "settings": plan.settings}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set_path(out: Path, plan: AttackPlan) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_.=," else "_" for ch in plan.label)
    return out / SET_DIR / f"{safe}__eps{plan.eps_column:.6g}.npz"


def _attack_on(cfg: TransferConfig, source, plan: AttackPlan):
    """The attack of ``plan`` on the source's logits, seeded as an evaluation's transfer shards
    of this setting are (the seed depends on the setting, not on the slice)."""
    from dundi.robustness.threats import build_threat

    spec = ShardSpec(plan.name, plan.eps_column, "transfer", 0, 0, plan.settings_id, plan.label)
    return plan.build(build_threat("transfer", native=source.model).model, setting_seed(cfg.eval_config(), spec))


def craft_set(cfg: TransferConfig, source, plan: AttackPlan, images: np.ndarray, labels: np.ndarray,
              ids: np.ndarray) -> np.ndarray:
    """The adversarial images of one attack setting on the source's logits, batch by batch, at
    one torch thread as an evaluation's shards are: each sample draws from its own random
    stream and its gradients are the same bits in any batch (:mod:`dundi.nets.invariant`), so
    the images do not depend on ``batch_size``."""
    import torch

    attack = _attack_on(cfg, source, plan)
    out = np.empty_like(images)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, len(labels), cfg.batch_size):
            stop = min(start + cfg.batch_size, len(labels))
            x, y = torch.from_numpy(images[start:stop].copy()), torch.from_numpy(labels[start:stop].copy())
            keys = torch.from_numpy(ids[start:stop].copy())
            out[start:stop] = attack.run(x, y, keys=keys).adv.detach().float().numpy()
    finally:
        torch.set_num_threads(before)
    return out


def _load_or_craft(cfg: TransferConfig, out: Path, source, plan: AttackPlan, samples, log) -> np.ndarray:
    """A finished set of this fingerprint is read back (no pickles); otherwise crafted and
    written atomically, so a killed run recrafts at most the set it was on."""
    images, labels, ids = samples
    path, fp = _set_path(out, plan), _fingerprint(cfg, source.meta, plan)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["fingerprint"]) == fp and np.array_equal(f["sample_id"], ids):
                    log(f"kept {path.name} (crafted before)")
                    return f["adv"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # damaged or foreign: craft again
            pass
    log(f"crafting {plan.label} (eps {plan.eps_column:g}) on {len(ids)} images")
    adv = craft_set(cfg, source, plan, images, labels, ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, adv=adv, sample_id=ids, label=labels, attack=np.array(plan.label), eps=np.array(plan.eps_column),
             fingerprint=np.array(fp))
    os.replace(tmp, path)
    return adv


def _answers(run, images: np.ndarray) -> np.ndarray:
    """What the run serves: the two-step rule at its defaults for a DunDi run, the argmax of the
    logits for a native one (:meth:`dundi.run.directory.Run.classify`)."""
    return run.classify(images).labels.astype(np.int64)


def run_transfer(cfg: TransferConfig, out: str | os.PathLike, log=print) -> dict[str, Any]:
    """Craft every attack setting once on the source, score every target on each set; write
    the sets, the rows and the summary (``transfer.json``) under ``out``; return the summary."""
    from dundi.run.directory import Run

    cfg.validate()
    out = Path(out)
    source = Run.load(cfg.source, with_oracle=False)
    if source.meta["kind"] != "native":
        raise DundiError(f"the source {cfg.source} is a {source.meta['kind']} run: craft on a native run "
                         f"(`dundi train-native`), whose logits the attacks climb")
    targets = [Run.load(t) for t in cfg.targets]
    _check_targets(source, targets)
    samples = _samples(cfg, source.meta)
    images, labels, ids = samples
    plans = plan_attacks(cfg.eval_config(), source.meta["dataset"])
    source_clean = _answers(source, images)
    clean = {t: _answers(run, images) for t, run in zip(cfg.targets, targets)}
    tables, attacks = [], []
    for plan in plans:
        adv = _load_or_craft(cfg, out, source, plan, samples, log)
        diff = (adv.astype(np.float64) - images.astype(np.float64)).reshape(len(ids), -1)
        linf, l0 = np.abs(diff).max(1), (np.abs(diff) > 1e-6).sum(1)
        source_adv = _answers(source, adv)
        attacks.append(_attack_entry(plan, cfg, source, labels, source_clean, source_adv, linf))
        for name, run in zip(cfg.targets, targets):
            tables.append(pa.table({
                "sample_id": ids, "position": np.arange(len(ids)), "label": labels,
                "attack": [plan.label] * len(ids), "eps": np.full(len(ids), plan.eps_column),
                "target": [repo_relative(name)] * len(ids), "target_kind": [run.meta["kind"]] * len(ids),
                "source_clean": source_clean, "source_adv": source_adv, "target_clean": clean[name],
                "target_adv": _answers(run, adv), "linf": linf, "l0": l0}, schema=ROW_SCHEMA))
    rows = pa.concat_tables(tables)
    tmp = out / f"{ROWS_FILE}.tmp{os.getpid()}"
    pq.write_table(rows, tmp)
    os.replace(tmp, out / ROWS_FILE)
    summary = summarize(rows, cfg, source, attacks)
    atomic_write_json(out / TRANSFER_FILE, summary)
    return summary


def _attack_entry(plan: AttackPlan, cfg: TransferConfig, source, labels, source_clean, source_adv,
                  linf) -> dict[str, Any]:
    """One attack setting as crafted: its settings and what it did to the source itself."""
    built = _attack_on(cfg, source, plan)
    fooled = int((source_adv != labels).sum())
    return {"attack": plan.label, "eps": plan.eps_column, "params": attack_params(built),
            "source_accuracy_adv": float((source_adv == labels).mean()), "source_fooled": fooled,
            "source_clean_accuracy": float((source_clean == labels).mean()), "max_linf": float(linf.max())}


def summarize(rows: pa.Table, cfg: TransferConfig, source, attacks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per target and attack: clean accuracy on the sample and defense success (the paper's
    measure: adversarial samples the target answers correctly / all adversarial samples), each
    with its 95% Wilson interval."""
    cols = {name: np.asarray(rows.column(name).to_pylist()) for name in
            ("attack", "target", "target_kind", "label", "target_clean", "target_adv")}
    figures = []
    for target in dict.fromkeys(cols["target"]):
        mine = cols["target"] == target
        once = mine & (cols["attack"] == attacks[0]["attack"])  # every attack holds each sample once
        right_clean, total = int((cols["target_clean"][once] == cols["label"][once]).sum()), int(once.sum())
        entry: dict[str, Any] = {"target": target, "kind": str(cols["target_kind"][mine][0]), "attacks": {},
                                 "clean_accuracy": right_clean / total,
                                 "clean_accuracy_ci95": list(wilson_interval(right_clean, total))}
        for a in attacks:
            sel = mine & (cols["attack"] == a["attack"])
            right_adv = int((cols["target_adv"][sel] == cols["label"][sel]).sum())
            count = int(sel.sum())
            entry["attacks"][a["attack"]] = {"defense_success": right_adv / count, "correct": right_adv,
                                             "count": count, "ci95": list(wilson_interval(right_adv, count))}
        figures.append(entry)
    return {"protocol": "shared-source transfer: each attack crafted once on the source's logits, "
                        "every target scored on the same adversarial images with the answer it serves",
            "source": {"run": repo_relative(cfg.source), "arch": source.meta.get("arch"),
                       "dataset": source.meta["dataset"],
                       "weights_sha256": source.meta.get("files", {}).get("model.safetensors")},
            "split": cfg.split, "seed": cfg.seed, "count": int(len(set(rows.column("sample_id").to_pylist()))),
            "attacks": attacks, "targets": figures}


__all__ = ["TransferConfig", "run_transfer", "craft_set", "summarize", "TRANSFER_FILE", "ROWS_FILE"]
