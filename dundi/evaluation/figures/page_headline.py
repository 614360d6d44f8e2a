"""The headline table of README.md and docs/results/README.md: AutoAttack on the exact rule, DunDi-AT
and certified DunDi against a Madry-style LeNet-5, with the certificate beside each."""

from __future__ import annotations

from pathlib import Path

from dundi.evaluation.figures.raw import attack_row, evaluation_of, raw_json, share, table
from dundi.evaluation.figures.registry import block


def _autoattack(root: Path) -> str:
    """The headline question: AutoAttack on the exact rule, DunDi-AT and certified DunDi against
    a Madry-style LeNet-5, one seed each."""
    aa10k = raw_json(root, "autoattack/whole-split/report.json")
    cert10k = evaluation_of(raw_json(root, "certified/whole-split/report.json"))
    full = evaluation_of(raw_json(root, "at-full/report.json"))
    curve = evaluation_of(raw_json(root, "certified/full-mnist-curve/report.json"))
    certify_full = raw_json(root, "certified/mnist-full-certify.json")
    rows = []

    def row(model: str, sample: str, clean: float, n: int, robust: float | None,
            certified: float | None, raw: str) -> None:
        rows.append([model, sample, share(clean, n),
                     f"**{share(robust, n)}**" if robust is not None else "not attacked on this sample",
                     share(certified, n) if certified is not None else "— (no proof)", f"`{raw}`"])

    at = evaluation_of(aa10k, "AT5")
    madry = evaluation_of(aa10k, "madry5")
    whole = "mnist-10k, whole test split"
    row("DunDi-AT (LeNet-5), exact rule k = 5", whole, at["clean_accuracy"]["dundi"], 2000,
        attack_row(at, "autoattack", "adaptive", 0.3)["robust_accuracy"], None,
        "autoattack/whole-split/report.json")
    row("Madry-style LeNet-5, 40 epochs", whole, madry["clean_accuracy"]["native"], 2000,
        attack_row(madry, "autoattack", "transfer", 0.3)["native_robust_accuracy"], None,
        "autoattack/whole-split/report.json")
    cert = cert10k["certified"][0]
    row("Certified DunDi (cnn-ibp), exact rule k = 5", whole, cert10k["clean_accuracy"]["dundi"],
        2000, attack_row(cert10k, "autoattack", "adaptive", 0.3)["robust_accuracy"],
        cert["certified_accuracy"], "certified/whole-split/report.json")
    seeded = "full MNIST, 2,000 seeded test images"
    row("DunDi-AT (LeNet-5), exact rule k = 5", seeded, full["clean_accuracy"]["dundi"], 2000,
        attack_row(full, "autoattack", "adaptive", 0.3)["robust_accuracy"], None, "at-full/report.json")
    row("Madry-style LeNet-5, 15 epochs", seeded, full["clean_accuracy"]["native"], 2000,
        attack_row(full, "autoattack", "transfer", 0.3)["native_robust_accuracy"], None,
        "at-full/report.json")
    curve_cert = next(c for c in curve["certified"] if abs(c["eps"] - 0.3) < 1e-9)
    row("Certified DunDi (cnn-ibp, 40 epochs), exact rule k = 5", "full MNIST, 500 seeded test images",
        curve["clean_accuracy"]["dundi"], 500,
        attack_row(curve, "autoattack", "adaptive", 0.3)["robust_accuracy"],
        curve_cert["certified_accuracy"], "certified/full-mnist-curve/report.json")
    n = certify_full["count"]
    row("Certified DunDi (cnn-ibp, 40 epochs), same run", "full MNIST, whole test set",
        certify_full["clean_accuracy"], n, None, certify_full["certified_accuracy"]["0.3"],
        "certified/mnist-full-certify.json")
    header = ["Model (one training seed, seed 0)", "Data, sample", "Clean [95% CI] (count)",
              "AutoAttack robust, L∞ 0.3 [95% CI] (count)", "Certified at L∞ 0.3", "Raw file (docs/results/)"]
    return table(header, rows)


block("autoattack")(_autoattack)
