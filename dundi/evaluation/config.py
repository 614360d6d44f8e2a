"""The settings of an adversarial evaluation, in one place and checked once.

:class:`EvalConfig` holds everything that decides an evaluation's rows (plus where the data
lives and which device computes). Its field defaults are the only copy of the evaluation's
defaults: the ``dundi evaluate`` parser reads them from here. The attack settings the paper
fixes per dataset (:data:`DATASET_SETTINGS`) and per threat model (:data:`THREAT_SETTINGS`)
live here too; :mod:`dundi.evaluation.plan` turns them, with each attack's own defaults, into
one :class:`~dundi.evaluation.plan.AttackPlan` per attack.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dundi.errors import DundiError
from dundi.rule.params import KEPT_CLASSES, TwoStepRule

PAPER_ATTACKS = ("fgsm", "ifgsm-a", "ifgsm-b", "jsma")
PAPER_N_VALUES = (1, 10, 20)
DEVICE_HELP = "auto (a GPU when PyTorch sees one), cpu, cuda or cuda:N"
# The paper's settings where they differ from the attacks' MNIST defaults (DESIGN.md §1).
DATASET_SETTINGS: dict[str, dict[str, float]] = {"cifar10": {"eps": 0.05, "alpha": 0.005}}
# Attacks on DunDi's distance scores use the CW margin unless told otherwise: summed embedding
# distances are large, so softmax cross-entropy saturates in float32 and its gradient is exactly
# zero for most samples (seen on DunDi_R3: 74% of samples), which would understate the attack.
THREAT_SETTINGS: dict[str, dict[str, str]] = {"adaptive": {"loss": "margin"}, "adaptive-all": {"loss": "margin"},
                                              "feature": {"loss": "margin"}}


@dataclasses.dataclass
class EvalConfig:
    """Everything that decides the rows of an evaluation (plus where the data lives and which
    device computes them)."""

    run: str                                  # DunDi run directory (with its oracle index)
    native: str | None = None                 # native run (transfer threat model; native columns)
    attacks: list[str] = dataclasses.field(default_factory=lambda: list(PAPER_ATTACKS))
    threats: list[str] = dataclasses.field(default_factory=lambda: ["transfer"])
    eps: list[float] | None = None            # None: each attack's own budget (paper settings)
    steps: int | None = None                  # None: each attack's default
    seed: int = 0                             # sample selection and per-setting attack seeds
    limit: int | None = None                  # evaluate this many samples of the split
    split: str = "test"
    shard_size: int = 64
    n: int | None = None                      # the two-step rule (``rule``): n None = all oracles,
    m: int | None = None                      # m None = min(3, n)
    k: int = KEPT_CLASSES
    n_values: list[int] = dataclasses.field(default_factory=lambda: list(PAPER_N_VALUES))
    temperature: float = 1.0                  # divides the target model's scores (threats.py)
    nearest: int = 3                          # oracles per class the feature scorer uses
    attack_kw: dict[str, Any] = dataclasses.field(default_factory=dict)
    save_adv: bool = False                    # keep the adversarial images in the rows
    data_dir: str | None = None               # where the dataset cache is (not part of the rows)
    device: str = "cpu"                       # where networks and attacks run (not part of the
                                              # fingerprint): cpu by default, where rows are the
                                              # same bits in any layout; ask for a GPU

    @property
    def rule(self) -> TwoStepRule:
        """The deployed rule the evaluation judges by (resolved against the run's index)."""
        return TwoStepRule(self.n, self.m, self.k)

    def validate(self) -> None:
        from dundi.attacks import ATTACKS, STAND_IN_ONLY
        from dundi.robustness.threats import THREATS

        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise DundiError(f"unknown attack(s) {', '.join(unknown)}: choose from {', '.join(ATTACKS)}")
        bad = [t for t in self.threats if t not in THREATS]
        if bad:
            raise DundiError(f"unknown threat model(s) {', '.join(bad)}: choose from {', '.join(THREATS)}")
        if not self.attacks or not self.threats:
            raise DundiError("an evaluation needs at least one attack and one threat model")
        if "transfer" in self.threats and not self.native:
            raise DundiError("the transfer threat model (the paper's) crafts on the native model: "
                             "pass --native NATIVE_RUN")
        if self.shard_size < 1:
            raise DundiError(f"shard size must be positive, got {self.shard_size}")
        if self.eps is not None and any(not e >= 0 for e in self.eps):
            raise DundiError(f"eps must be non-negative, got {self.eps}")
        if self.limit is not None and self.limit < 1:
            raise DundiError(f"limit must be positive, got {self.limit}")
        if self.steps is not None and self.steps < 1:
            raise DundiError(f"--steps must be at least 1, got {self.steps}")
        only = [a for a in self.attacks if a in STAND_IN_ONLY]
        if only and any(t != "adaptive" for t in self.threats):
            raise DundiError(f"{', '.join(only)} attacks step 1 of DunDi's two-step rule: use it with "
                             f"--threat adaptive only")
        if "eps" in self.attack_kw:
            raise DundiError(f"--attack-arg eps={self.attack_kw['eps']}: the budget has one flag, "
                             f"--eps {self.attack_kw['eps']}")
        check_device(self.device)
        check_attack_args(self.attacks, self.attack_kw)
        check_linf_eps(self.attacks, self.eps, self.attack_kw)


def check_device(device: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a GPU that PyTorch cannot see is refused
    here, in the driver, not in a worker."""
    name, _, index = device.partition(":")
    if name not in ("auto", "cpu", "cuda") or (index and (name != "cuda" or not index.isdigit())):
        raise DundiError(f"--device {device!r} is not a device: use {DEVICE_HELP}")
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DundiError(f"--device {device}: PyTorch sees no CUDA GPU here; use --device cpu "
                             f"(or auto), or install a CUDA build of torch")
        if index and int(index) >= torch.cuda.device_count():
            raise DundiError(f"--device {device}: PyTorch sees {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def resolve_device(device: str) -> str:
    """The torch device an evaluation computes on: ``auto`` is the GPU when PyTorch sees one."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return default is None or isinstance(value, type(default))


def check_attack_args(attacks: list[str], attack_kw: dict[str, Any]) -> None:
    """Refuse an ``--attack-arg`` key that none of the selected attacks takes (a typo such as
    ``restart=5`` would otherwise run the default silently) or a value of the wrong type,
    naming the accepted keys / the expected type."""
    from dundi.attacks import ATTACKS

    defaults = {name: ATTACKS[name].options() for name in attacks}
    for key, value in attack_kw.items():
        takers = [n for n in attacks if key in defaults[n]]
        if not takers:
            accepted = sorted({k for d in defaults.values() for k in d})
            raise DundiError(f"--attack-arg {key}: no selected attack ({', '.join(attacks)}) takes it; "
                             f"accepted keys: {', '.join(accepted)}")
        for name in takers:
            default = defaults[name][key]
            if not _type_ok(value, default):
                raise DundiError(f"--attack-arg {key}={value}: {name} expects "
                                 f"{_TYPE_NAMES.get(type(default), type(default).__name__)}")


def check_linf_eps(attacks: list[str], eps: list[float] | None, attack_kw: dict[str, Any]) -> None:
    """L∞ budgets must lie in (0, 1]: pixels are in [0, 1], so 0 is no attack (it would
    enter the worst case as 100% robust) and anything above 1 is no constraint at all."""
    from dundi.attacks import ATTACKS

    linf = [a for a in attacks if ATTACKS[a].norm == "linf" and attack_kw.get("norm", "linf") == "linf"]
    bad = [e for e in eps or [] if not 0 < e <= 1]
    if linf and bad:
        raise DundiError(f"L∞ eps must be in (0, 1] for {', '.join(linf)} (pixels are in [0, 1]); got "
                         f"{', '.join(f'{e:g}' for e in bad)}")


__all__ = ["EvalConfig", "PAPER_ATTACKS", "PAPER_N_VALUES", "DATASET_SETTINGS", "THREAT_SETTINGS",
           "check_attack_args", "check_linf_eps", "check_device", "resolve_device"]
