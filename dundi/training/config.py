"""Every setting of a training run, in one dataclass that is saved verbatim in the run and
checked once (``validate``): the per-epoch passes, the loop, the CLI and the Ray edge all read
this, and resuming compares it field by field."""

from __future__ import annotations

import dataclasses
import json

from dundi.nets.names import CERTIFIABLE
from dundi.rule.params import DEFAULT_METRIC, check_metric

# The values each setting accepts live here, beside the defaults, and this module imports no
# torch: `dundi`'s parser lists them without loading a network (docs/ARCHITECTURE.md).
LOSSES = ("sigmoid", "margin")  # the triplet losses of dundi.training.losses
MINING = ("random", "batch-hard")
ADV_TARGETS = ("classes", "tuple")
ADV_LOSSES = ("prototype", "triplet")
CERT_HEADS = ("batch", "prototypes")  # what certified DunDi's head is trained against


@dataclasses.dataclass
class TrainConfig:
    """Everything that determines a training run. Saved verbatim in the run's metadata."""

    dataset: str = "mnist-10k"
    arch: str = "lenet5"
    epochs: int = 5
    batch_size: int = 128          # images (native) or tuples (triplet) per step
    lr: float = 1e-3
    seed: int = 0
    tuples: int = 60_000           # size of the tuple set (paper: 360K), reshuffled each epoch
    loss: str = "sigmoid"          # the paper's 1 − sigmoid(d_an − d_ap); or "margin"
    margin: float = 1.0
    mining: str = "random"         # paper's random tuples; or "batch-hard"
    embed_dim: int = 128
    metric: str = DEFAULT_METRIC   # the two-step rule's distance: euclidean (paper) | sqeuclidean
    dedupe: bool = True            # embed each distinct image of a batch once (same loss, faster)
    val_fraction: float = 0.1      # held out of the training split for per-epoch validation
    val_oracles: int = 10          # oracles per class for the per-epoch two-step validation
    limit: int | None = None       # use only the first N training samples (quick runs)
    holdout_classes: tuple[int, ...] = ()  # dataset classes left out of training (enrolled later)
    # Adversarial training (DunDi-AT for triplet runs, Madry-style PGD for native runs)
    adversarial: bool = False
    adv_eps: float = 0.3           # L∞ budget of the PGD examples crafted during training
    adv_steps: int = 10
    adv_alpha: float | None = None  # PGD step; default 2.5 · eps / steps
    adv_mix: float = 0.5           # weight of the adversarial loss (1.0: adversarial only)
    adv_warmup: int = 0            # epochs over which the budget ramps linearly up to adv_eps
    adv_target: str = "classes"    # classes: leave the anchor's class; tuple: maximise its triplet loss
    adv_loss: str = "prototype"    # classes target: prototype (N-pair softmax) | triplet (hardest negative)
    # Certified training (IBP through the embedding, dundi.training.certified): needs sqeuclidean
    certified: bool = False
    cert_eps: float = 0.3          # L∞ budget the worst-case loss is trained at (final value)
    cert_mix: float = 0.5          # final weight of the worst-case loss
    cert_warmup: float = 3.0       # epochs of clean training before the budget starts to grow
    cert_ramp: float = 30.0        # epochs over which eps and mix grow linearly to their final values
    cert_per_class: int = 20       # images of each class per batch (the batch is the oracle database)
    cert_head: str = "batch"       # batch: the batch's own class means; prototypes: learned ones

    def __post_init__(self) -> None:
        # JSON gives back a list; one canonical form keeps saved and resumed configs equal
        self.holdout_classes = tuple(sorted({int(c) for c in self.holdout_classes}))

    @property
    def adv_step_size(self) -> float:
        return self.adv_alpha if self.adv_alpha is not None else 2.5 * self.adv_eps / self.adv_steps

    def validate(self) -> None:
        from dundi.errors import DundiError

        if self.loss not in LOSSES:
            raise DundiError(f"--loss {self.loss!r} is unknown: choose one of {', '.join(LOSSES)}")
        check_metric(self.metric)
        if self.mining not in MINING:
            raise DundiError(f"--mining {self.mining!r} is unknown: choose one of {', '.join(MINING)}")
        for name in ("epochs", "batch_size", "tuples", "embed_dim"):
            if getattr(self, name) < 1:
                raise DundiError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.adversarial and not (0 < self.adv_eps <= 1 and self.adv_steps >= 1 and 0 <= self.adv_mix <= 1):
            raise DundiError("adversarial training needs 0 < adv_eps <= 1, adv_steps >= 1, 0 <= adv_mix <= 1")
        if self.adv_target not in ADV_TARGETS:
            raise DundiError(f"--adv-target {self.adv_target!r} is unknown: choose one of {', '.join(ADV_TARGETS)}")
        if self.adv_loss not in ADV_LOSSES:
            raise DundiError(f"--adv-loss {self.adv_loss!r} is unknown: choose one of {', '.join(ADV_LOSSES)}")
        if self.adv_warmup < 0:
            raise DundiError(f"adv_warmup must be 0 or more epochs, got {self.adv_warmup}")
        if self.cert_head != "batch" and not self.certified:
            raise DundiError(f"--cert-head {self.cert_head} is a head of certified training: add --certified")
        if self.certified:
            if self.arch not in CERTIFIABLE:
                raise DundiError(f"--certified needs a backbone interval bounds can train through: "
                                 f"{self.arch} is not one (choose {', '.join(CERTIFIABLE)})")
            if self.metric != "sqeuclidean":
                raise DundiError("certified training certifies the squared-Euclidean rule: "
                                 "use --metric sqeuclidean (the --certified default)")
            if self.adversarial:
                raise DundiError("--certified and --adversarial are two different trainings: pick one")
            if not (0 < self.cert_eps <= 1 and 0 <= self.cert_mix <= 1):
                raise DundiError(f"certified training needs 0 < cert_eps <= 1 and 0 <= cert_mix <= 1; "
                                 f"got {self.cert_eps}, {self.cert_mix}")
            if self.cert_head not in CERT_HEADS:
                raise DundiError(f"--cert-head {self.cert_head!r} is unknown: choose one of {', '.join(CERT_HEADS)}")
            if self.cert_per_class < 2 or self.cert_warmup < 0 or self.cert_ramp < 0:
                raise DundiError("certified training needs cert_per_class >= 2 (a class's other members "
                                 "are its oracles) and cert_warmup, cert_ramp >= 0 epochs")
        if not 0.0 <= self.val_fraction < 0.5:
            raise DundiError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}")


def with_defaults(saved: dict) -> dict:
    """A saved config with the fields added to TrainConfig since it was written filled in with
    their defaults: code that predates a field behaved as its default, so a checkpoint written
    before the field existed is the same experiment, not "another configuration"."""
    return {**json_config(TrainConfig()), **saved}


def json_config(cfg: TrainConfig) -> dict:
    """The config as JSON would give it back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
