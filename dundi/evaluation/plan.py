"""An evaluation's plan: one :class:`AttackPlan` per attack setting, cut into shards.

An :class:`AttackPlan` is built once per (threat model, attack, budget) from the attack's
class, without building the attack: its settings are the class's declared options
(:meth:`dundi.attacks.base.Attack.options`) overridden, in this order, by the dataset's and the
threat model's paper settings (:mod:`dundi.evaluation.config`), ``--attack-arg``, ``--steps``
and ``--eps``. Its budget is read from those settings at the class's ``budget_arg``: eps for
L∞/L2 attacks, JSMA's gamma; an attack without one (DeepFool) is *unbounded*
(``budget is None``). eps has this one source; the rows store an unbounded attack's eps as
inf (their format since version 1), and only :attr:`AttackPlan.eps_column` writes it.

Shards (:class:`ShardSpec`) cut each plan's samples into ``shard_size`` slices; they name the
plan by attack, eps column, threat and settings hash, which is how finished shards are found
again on a rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import numpy as np

from dundi.errors import DundiError
from dundi.evaluation.config import DATASET_SETTINGS, THREAT_SETTINGS, EvalConfig
from dundi.evaluation.results import shard_name

FORMAT_VERSION = 3  # 3: per-sample random streams, batch-invariant stand-ins (rows independent of
                    # the layout); 2: ``adaptive`` attacks the exact two-step stand-in


def _plain(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str)) or value is None


def attack_params(attack) -> dict[str, Any]:
    """Every plain setting of a built attack object, for the rows and the report."""
    out = {"class": type(attack).__name__}
    for key, value in vars(attack).items():
        if key.startswith("_") or key in ("model", "device"):
            continue
        if _plain(value):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
            out[key] = list(value)
    return out


def _settings_hash(params: dict[str, Any]) -> str:
    params = {k: v for k, v in params.items() if k != "seed"}
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]


def attack_settings_id(attack) -> str:
    """Short hash of every setting of a built attack except its seed (seeds are per setting);
    equal to its plan's :attr:`AttackPlan.settings_id` (a test holds them together)."""
    return _settings_hash(attack_params(attack))


def attack_eps(attack) -> float:
    """The budget a built attack enforces, in its norm (:attr:`Attack.budget`; inf: unbounded)."""
    return attack.budget


def attack_steps(attack, num_features: int) -> int:
    """Configured iterations, as the attack declares them (:meth:`Attack.configured_steps`):
    steps / max_iter / n_queries; JSMA's largest number of pixel-pair updates; 1 for FGSM."""
    return attack.configured_steps(num_features)


@dataclasses.dataclass(frozen=True)
class AttackPlan:
    """One attack setting of an evaluation, planned once: the registry name, the threat model
    it attacks, every constructor setting but the seed, and the name its rows carry."""

    name: str
    threat: str
    settings: dict[str, Any]
    label: str

    @property
    def cls(self) -> type:
        from dundi.attacks import ATTACKS

        return ATTACKS[self.name]

    @property
    def budget(self) -> float | None:
        """The budget in the attack's norm, from its settings; None: the attack is unbounded."""
        arg = self.cls.budget_arg
        return None if arg is None else float(self.settings[arg])

    @property
    def unbounded(self) -> bool:
        return self.cls.budget_arg is None

    @property
    def eps_column(self) -> float:
        """The budget as the rows' ``eps`` column stores it: inf for an unbounded attack."""
        return math.inf if self.unbounded else self.budget

    @property
    def settings_id(self) -> str:
        """The settings hash shard names carry: the class, its settings as the attack stores
        them (:attr:`Attack.fixed_settings` included), no seed."""
        stored = {**self.settings, **self.cls.fixed_settings}
        return _settings_hash({"class": self.cls.__name__, **{k: v for k, v in stored.items() if _plain(v)}})

    def build(self, model, seed: int = 0):
        """The attack on ``model`` (its seed: :func:`setting_seed`)."""
        kw = dict(self.settings)
        if self.cls.seeded:
            kw["seed"] = seed
        try:
            return self.cls(model, **kw)
        except (ValueError, TypeError) as exc:  # an attack's own check on a setting's value
            raise DundiError(f"{self.name}: {exc}") from None


def _coerce(value: Any, default: Any) -> Any:
    """An integer given for a float setting as a float (the attack stores what it is given,
    and the settings hash must not tell 1 from 1.0)."""
    return float(value) if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool) else value


def attack_label(name: str, cfg: EvalConfig) -> str:
    """The name an attack's rows carry: its registry name, plus the settings this call gave it
    explicitly (``--steps``, ``--attack-arg``) that it takes, e.g. ``pgd[loss=margin,steps=100]``.
    Variants of one attack at one eps (CE and margin, 40 and 1,000 steps) are then separate
    rows, compared side by side and combined in the worst case."""
    from dundi.attacks import ATTACKS

    options = ATTACKS[name].options()
    given = {k: v for k, v in cfg.attack_kw.items() if k in options and k not in ("eps", "seed")}
    if cfg.steps is not None and ATTACKS[name].steps_arg:
        given["steps"] = cfg.steps
    if not given:
        return name
    return f"{name}[{','.join(f'{k}={v}' for k, v in sorted(given.items()))}]"


def plan_attack(cfg: EvalConfig, name: str, dataset: str, threat: str, eps: float | None = None) -> AttackPlan:
    """The plan of one attack at one budget (``eps`` reaches attacks whose budget is eps only;
    None: the settings' own). Settings an attack does not take are dropped, so one
    ``--attack-arg`` can serve several attacks."""
    from dundi.attacks import ATTACKS

    cls = ATTACKS[name]
    options = cls.options()
    given = {**DATASET_SETTINGS.get(dataset, {}), **THREAT_SETTINGS.get(threat, {}), **cfg.attack_kw}
    settings = {**options, **{k: _coerce(v, options[k]) for k, v in given.items() if k in options}}
    if cfg.steps is not None and cls.steps_arg:
        settings[cls.steps_arg] = cfg.steps
    if eps is not None and cls.budget_arg == "eps":
        settings["eps"] = float(eps)
    settings.pop("seed", None)
    return AttackPlan(name, threat, settings, attack_label(name, cfg))


def plan_attacks(cfg: EvalConfig, dataset: str) -> list[AttackPlan]:
    """Every attack setting of the evaluation, threat by threat: one plan per ``--eps`` for
    attacks whose budget is eps, else one at the attack's own budget."""
    from dundi.attacks import ATTACKS

    plans = []
    for threat in cfg.threats:
        for name in cfg.attacks:
            budgets = cfg.eps if cfg.eps is not None and ATTACKS[name].budget_arg == "eps" else [None]
            plans += [plan_attack(cfg, name, dataset, threat, e) for e in budgets]
    return plans


def make_attack_for(name: str, model, eps: float | None, cfg: EvalConfig, dataset: str, seed: int,
                    threat: str = "transfer"):
    """The attack ``name`` on ``model`` with the evaluation's settings (:func:`plan_attack`)."""
    return plan_attack(cfg, name, dataset, threat, eps).build(model, seed)


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    attack: str
    eps: float          # the rows' eps column (AttackPlan.eps_column): inf for an unbounded attack
    threat: str
    start: int          # range of the evaluation's sample list
    stop: int
    settings: str = ""  # AttackPlan.settings_id
    label: str = ""     # the attack's name in the rows: its registry name + explicit settings

    @property
    def attack_label(self) -> str:
        return self.label or self.attack

    @property
    def name(self) -> str:
        return shard_name(self.attack, self.eps, self.threat, self.start, self.stop, self.settings)

    @property
    def plan_key(self) -> tuple[str, str, float, str]:
        return (self.threat, self.attack, self.eps, self.settings)


def plan_key(plan: AttackPlan) -> tuple[str, str, float, str]:
    """The key that ties a shard (:attr:`ShardSpec.plan_key`) to its plan."""
    return (plan.threat, plan.name, plan.eps_column, plan.settings_id)


def plan_shards(cfg: EvalConfig, num_samples: int, plans: list[AttackPlan]) -> list[ShardSpec]:
    specs = []
    for plan in plans:
        for start in range(0, num_samples, cfg.shard_size):
            stop = min(start + cfg.shard_size, num_samples)
            specs.append(ShardSpec(plan.name, plan.eps_column, plan.threat, start, stop,
                                   plan.settings_id, plan.label))
    return specs


def budgets(plans: list[AttackPlan]) -> dict[str, list[float]]:
    """Per attack, the budgets evaluated, as ``evaluation.json`` records them (eps column)."""
    out: dict[str, list[float]] = {}
    for plan in plans:
        if plan.eps_column not in out.setdefault(plan.name, []):
            out[plan.name].append(plan.eps_column)
    return out


def select_samples(count: int, limit: int | None, seed: int) -> np.ndarray:
    """Positions in the split to evaluate: a seeded permutation, cut at ``limit``. Test splits
    are often sorted by class, so a prefix would not do; a permutation prefix keeps the first
    shards of a larger evaluation identical to those of a smaller one."""
    order = np.random.default_rng(seed).permutation(count)
    return order if limit is None else order[: min(limit, count)]


def setting_seed(cfg: EvalConfig, spec: ShardSpec) -> int:
    """The attack's seed for one (threat, attack setting, eps): the same for every shard of it.
    Each sample then draws from its own stream keyed by its sample id
    (:mod:`dundi.attacks.draws`), so its random start and proposals do not depend on the shard
    it falls in (a seed per shard made shard size change every row's attack)."""
    ident = f"{cfg.seed}:{spec.threat}:{spec.attack_label}:{spec.eps!r}:{spec.settings}"
    return int(hashlib.sha256(ident.encode()).hexdigest()[:8], 16)


def fingerprint(cfg: EvalConfig, meta: dict, native_meta: dict) -> str:
    """Identity of the evaluation: both runs' weights and oracle index (by sha256, from their
    run.json as read by the caller), the sample seed, the two-step and threat-model settings.
    The grid, the sample count, the attack settings and the device are not part of it: the
    first three name shards (see :func:`plan_shards`)."""
    ident = {
        "version": FORMAT_VERSION,
        "dundi_files": meta.get("files", {}),
        "native_files": native_meta.get("files", {}),
        **{k: v for k, v in dataclasses.asdict(cfg).items()
           if k not in ("run", "native", "attacks", "threats", "eps", "limit", "data_dir", "steps",
                        "attack_kw", "device")},
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_info(run_dir: str | None, meta: dict) -> dict[str, Any]:
    """What the report says of a run, from its run.json (read by the caller)."""
    if not run_dir:
        return {}
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


__all__ = ["AttackPlan", "ShardSpec", "plan_attack", "plan_attacks", "plan_shards", "plan_key", "budgets",
           "select_samples", "setting_seed", "fingerprint", "model_info", "model_name", "attack_params",
           "attack_settings_id", "attack_eps", "attack_steps", "make_attack_for", "FORMAT_VERSION"]
