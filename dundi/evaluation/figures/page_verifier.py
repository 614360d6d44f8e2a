"""Interval against linear verifier (docs/results/certified/verifier/README.md): the same runs,
rule and served arithmetic, certified by each; only the bound that proves a margin differs."""

from __future__ import annotations

from pathlib import Path

from dundi.errors import DundiError
from dundi.evaluation.figures.raw import raw_json, share, table
from dundi.evaluation.figures.registry import block

VERIFIER = "certified/verifier"
# (row name, file stem): each stem has -interval.json and -linear.json beside this page
RUNS = (("full MNIST, prototype head 10 epochs (eps 0.4), herded image oracles", "dundi-e10-proto"),
        ("full MNIST, prototype head 10 epochs (eps 0.15), herded image oracles", "dundi-e10-eps015-proto"),
        ("full MNIST, prototype head 10 epochs (eps 0.4), prototypes as oracles", "dundi-e10-proto-syn"),
        ("full MNIST, prototype head 10 epochs (eps 0.15), prototypes as oracles", "dundi-e10-eps015-proto-syn"),
        ("full MNIST, prototype head 40 epochs (eps 0.4), prototypes as oracles", "dundi-e40-proto"),
        ("mnist-10k, batch-mean head 60 epochs (eps 0.35), seed 0", "cert-s0"))


def _pair(root: Path, stem: str) -> tuple[dict, dict]:
    interval, linear = (raw_json(root, f"{VERIFIER}/{stem}-{v}.json") for v in ("interval", "linear"))
    for v, data in (("interval", interval), ("linear", linear)):
        if data.get("verifier") != v:
            raise DundiError(f"published figures: {VERIFIER}/{stem}-{v}.json was made by the "
                             f"{data.get('verifier')} verifier")
    if (interval["count"], interval["clean_accuracy"]) != (linear["count"], linear["clean_accuracy"]):
        raise DundiError(f"published figures: {stem}'s two files certify different images")
    return interval, linear


def _verifiers(root: Path) -> str:
    rows = []
    for name, stem in RUNS:
        interval, linear = _pair(root, stem)
        n = interval["count"]
        for eps, lo in interval["certified_accuracy"].items():
            hi = linear["certified_accuracy"][eps]
            rows.append([name, f"n={interval['n']} m={interval['m']} k={interval['k']}", share(interval["clean_accuracy"], n),
                         eps, share(lo, n), share(hi, n), f"{100 * (hi - lo):+.2f}",
                         f"{interval['seconds']:.0f} / {linear['seconds']:.0f}"])
    return table(["Run (cnn-ibp, whole test split)", "rule", "clean", "L∞ eps", "certified, interval",
                  "certified, linear", "gain (points)", "certify s (interval / linear)"], rows)


block("certified-verifiers")(_verifiers)
