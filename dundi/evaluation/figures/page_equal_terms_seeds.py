"""Equal terms at three training seeds (docs/results/certified/equal-terms/README.md): certified
DunDi with prototypes as oracles against softmax IBP, seed by seed, with the mean and range of
each and of their difference -- whether "level with softmax IBP" survives the seed."""

from __future__ import annotations

from pathlib import Path

from dundi.errors import DundiError
from dundi.evaluation.figures.raw import mean_range, raw_json, share, table
from dundi.evaluation.figures.page_equal_terms import EQUAL
from dundi.evaluation.figures.registry import block

SEEDS = (0, 1, 2)
# (eps trained at, run-name suffix, eps certified)
BUDGETS = ((0.4, "", "0.3"), (0.15, "-eps015", "0.1"))


def _files(seed: int, kind: str, suffix: str) -> tuple[str, str]:
    """Certify and train files of one seed: seed 0 is the page's main table, 1 and 2 seeds/."""
    if seed == 0:
        stem = f"dundi-e10{suffix}-proto" if kind == "proto" else f"sm-e10{suffix}"
        cert = f"{stem}-syn" if kind == "proto" else stem
        return f"{EQUAL}/{cert}-certify.json", f"{EQUAL}/{stem}-train.json"
    stem = f"{EQUAL}/seeds/{kind}{suffix}-s{seed}"
    return f"{stem}-certify.json", f"{stem}-train.json"


def _certified(root: Path, seed: int, kind: str, suffix: str, eps_train: float, eps_cert: str
               ) -> tuple[float, float, int]:
    """(clean, certified at eps_cert, count) of one model, checked against its training facts."""
    cert_rel, train_rel = _files(seed, kind, suffix)
    cert, train = raw_json(root, cert_rel), raw_json(root, train_rel)
    config = train["config"]
    if config["seed"] != seed or config["cert_eps"] != eps_train:
        raise DundiError(f"published figures: {train_rel} was trained at seed {config['seed']}, eps "
                         f"{config['cert_eps']}; the table says seed {seed}, eps {eps_train}")
    return cert["clean_accuracy"], cert["certified_accuracy"][eps_cert], cert["count"]



def _equal_terms_seeds(root: Path) -> str:
    rows = []
    for eps_train, suffix, eps_cert in BUDGETS:
        proto = [_certified(root, s, "proto", suffix, eps_train, eps_cert) for s in SEEDS]
        soft = [_certified(root, s, "sm", suffix, eps_train, eps_cert) for s in SEEDS]
        for seed, p, q in zip(SEEDS, proto, soft):
            rows.append([f"**{eps_cert}** (trained {eps_train:g})", f"seed {seed}", share(p[0], p[2]), share(p[1], p[2]),
                         share(q[0], q[2]), share(q[1], q[2]), f"{100 * (p[1] - q[1]):+.2f}"])
        gaps = [100 * (p[1] - q[1]) for p, q in zip(proto, soft)]
        rows.append([f"**{eps_cert}**", "mean (range)", mean_range([p[0] for p in proto]), mean_range([p[1] for p in proto]),
                     mean_range([q[0] for q in soft]), mean_range([q[1] for q in soft]),
                     f"{sum(gaps) / len(gaps):+.2f} ({min(gaps):+.2f} to {max(gaps):+.2f})"])
    return table(["L∞ eps", "training seed", "DunDi clean", "DunDi certified", "softmax IBP clean",
                  "softmax IBP certified", "DunDi − softmax (points)"], rows)


block("equal-terms-seeds")(_equal_terms_seeds)
