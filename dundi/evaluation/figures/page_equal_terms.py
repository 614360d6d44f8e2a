"""Certified DunDi against softmax IBP on equal terms (docs/results/certified/equal-terms/README.md):
the same network, data, batches, schedule and bound code."""

from __future__ import annotations

from pathlib import Path

from dundi.errors import DundiError
from dundi.evaluation.figures.raw import attack_row, evaluation_of, pct, raw_json, share, table
from dundi.evaluation.figures.registry import block


EQUAL = "certified/equal-terms"


def _aa_cells(root: Path, report: str | None, eps: float) -> tuple[str, str]:
    """AutoAttack robust accuracy of certified DunDi (adaptive, the exact rule) and of the softmax
    baseline (white-box on its logits: the transfer rows' native columns) in one evaluation;
    "not run" where the table names no evaluation for that budget."""
    if report is None:
        return "not run", "not run"
    native = attack_row(evaluation_of(raw_json(root, f"{EQUAL}/{report}/report.json")), "autoattack", "transfer", eps)
    return _aa_dundi_cell(root, report, eps), share(native["native_robust_accuracy"], native["count"])


def _aa_dundi_cell(root: Path, report: str | None, eps: float) -> str:
    """AutoAttack robust accuracy of DunDi alone (adaptive, the exact rule), or "not run"."""
    if report is None:
        return "not run"
    row = attack_row(evaluation_of(raw_json(root, f"{EQUAL}/{report}/report.json")), "autoattack", "adaptive", eps)
    return share(row["robust_accuracy"], row["count"])


# (eps trained at, run-name suffix, eps certified, AutoAttack evaluation of DunDi and softmax
# IBP, AutoAttack evaluation of DunDi with prototypes as oracles; None: not run)
EQUAL_BUDGETS = ((0.4, "", "0.3", "aa-eps0.3", "aa-proto-eps0.3"), (0.15, "-eps015", "0.1", "aa-eps0.1", "aa-proto-eps0.1"))
# (row name, certify file stem, train file stem, column of the AutoAttack cells) per budget
EQUAL_MODELS = (("Certified DunDi, sample oracles: rule n=20 m=3 k=5", "dundi-e10{}", "dundi-e10{}", 0),
                ("Certified DunDi, prototypes as oracles: n=2 m=2 k=5", "dundi-e10{}-proto-syn",
                 "dundi-e10{}-proto", 2),
                ("Softmax IBP (elided last layer)", "sm-e10{}", "sm-e10{}", 1))


def _equal_terms(root: Path) -> str:
    """Certified DunDi (its two kinds of oracle database) against the softmax IBP baseline on
    the same network, data, batches, schedule and bound code: full MNIST, the whole test set
    certified, AutoAttack on 1,000."""
    rows = []
    for eps_train, suffix, eps_cert, report, proto_report in EQUAL_BUDGETS:
        aa = (*_aa_cells(root, report, float(eps_cert)), _aa_dundi_cell(root, proto_report, float(eps_cert)))
        for name, cert_stem, train_stem, column in EQUAL_MODELS:
            cert = raw_json(root, f"{EQUAL}/{cert_stem.format(suffix)}-certify.json")
            train = raw_json(root, f"{EQUAL}/{train_stem.format(suffix)}-train.json")
            if train["config"]["cert_eps"] != eps_train:
                raise DundiError(f"published figures: {train_stem.format(suffix)} was trained at eps "
                                 f"{train['config']['cert_eps']}, the table says {eps_train}")
            n = cert["count"]
            rows.append([name, f"{eps_train:g}", share(cert["clean_accuracy"], n), f"**{eps_cert}**",
                         share(cert["certified_accuracy"][eps_cert], n), aa[column], f"{train['train_seconds']:,.0f}"])
    return table(["Model (cnn-ibp, 512 hidden; full MNIST, 10 epochs, one seed)", "trained at eps", "clean (10,000)",
                   "L∞ eps", "certified (10,000)", "AutoAttack (1,000)", "training s"], rows)


def _equal_terms_10k(root: Path) -> str:
    """The same comparison on mnist-10k (the README's certified recipe, 60 epochs)."""
    rows = []
    for name, run in (("Certified DunDi, rule n=20 m=3 k=5", "dundi-10k"), ("Softmax IBP", "sm-10k")):
        cert, train = raw_json(root, f"{EQUAL}/{run}-certify.json"), raw_json(root, f"{EQUAL}/{run}-train.json")
        n = cert["count"]
        rows.append([name, share(cert["clean_accuracy"], n), *[share(v, n) for v in cert["certified_accuracy"].values()],
                     f"{train['train_seconds']:,.0f}"])
    radii = raw_json(root, f"{EQUAL}/dundi-10k-certify.json")["certified_accuracy"]
    return table(["Model (mnist-10k, 2,000 test images, one seed)", "clean", *[f"certified at {e}" for e in radii],
                   "training s"], rows)


def _where_points_go(root: Path) -> str:
    """Certified DunDi (full MNIST, trained at 0.4) with the network fixed and the rule varied,
    then one training change, beside the softmax baseline: which part holds the gap."""
    cases = (("deployed rule: n=20 random oracles, m=3, k=5", "dundi-e10-certify.json"),
             ("step 1 switched off (k=10 keeps every class)", "diag-k10-certify.json"),
             ("n=500 random oracles (the class means, nearly)", "diag-n500-certify.json"),
             ("n=20 oracles chosen for margin (`index build --select-eps 0.3`)", "diag-margin-oracles-certify.json"),
             ("retrained with 40 images per class per batch (less noisy head)", "dundi-e10-pc40-certify.json"),
             ("retrained against learned prototypes, n=20 oracles herded toward them", "dundi-e10-proto-certify.json"),
             ("the same network, n=400 herded (a class's whole candidate pool: its mean, nearly)",
              "diag-proto-n400-certify.json"),
             ("the same network, n=20 oracles chosen for margin", "dundi-e10-proto-sel-certify.json"),
             ("the same network, the prototypes as oracles (2 per class, m=2)", "dundi-e10-proto-syn-certify.json"),
             ("softmax IBP, same network and schedule", "sm-e10-certify.json"))
    rows = []
    for label, raw in cases:
        cert = raw_json(root, f"{EQUAL}/{raw}")
        rows.append([label, pct(cert["clean_accuracy"]), pct(cert["certified_accuracy"]["0.1"]),
                     pct(cert["certified_accuracy"]["0.3"])])
    return table(["Full MNIST, 10,000 test images, trained at eps 0.4", "clean", "certified at 0.1",
                   "certified at 0.3"], rows)


def _prototype_head(root: Path) -> str:
    """The prototype run's learned head beside its herded oracles, both proved by the same
    float64 interval bound (a diagnostic, prototype_head.py): what realising the head costs."""
    raw = raw_json(root, f"{EQUAL}/prototype-head.json")
    rows = [[name, *(pct(figures[e]) for e in ("0", "0.1", "0.3"))]
            for name, figures in raw["certified_accuracy"].items()]
    return table([f"Head of `{raw['run']}` (full MNIST, {raw['count']:,} test images; {raw['bound']})",
                   "clean", "certified at 0.1", "certified at 0.3"], rows)


block("certified-equal-terms")(_equal_terms)
block("certified-equal-terms-10k")(_equal_terms_10k)
block("certified-where-points-go")(_where_points_go)
block("certified-prototype-head")(_prototype_head)
