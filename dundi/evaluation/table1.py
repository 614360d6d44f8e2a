"""The paper's Table 1 for one backbone on mnist-10k, end to end, on 2 CPU cores (`dundi demo`):
it trains the models, builds their index and evaluates them, so it sits above every room it drives.

fetch mnist-10k → native LeNet-5 (Model3) → DunDi_R3 and DunDi_P3 → oracle index (n=20)
→ two-step test accuracy for n = 1, 10, 20 → the paper's attacks (transfer) and FGSM/PGD
(adaptive) on a test sample → `dundi report` into out/report/. Each finished stage is kept: a demo that is
killed and started again continues where it stopped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dundi.data import fetch
from dundi.evaluation.report import slug, write_report
from dundi.files import atomic_write_json, atomic_write_text
from dundi.rule.params import TwoStepRule
from dundi.run.storage import RUN_FILE, index_version, read_meta
from dundi.run.pipeline import build_index, classify_split, train_dundi_run, train_native_run
from dundi.training.config import TrainConfig, json_config

DATASET = "mnist-10k"
ARCH = "lenet5"
N_VALUES = (1, 10, 20)


def _budgets(quick: bool) -> tuple[TrainConfig, TrainConfig, TrainConfig]:
    if quick:  # a smoke run for CI: same path, a fraction of the budget
        native = TrainConfig(DATASET, ARCH, epochs=3)
        dundi_r = TrainConfig(DATASET, ARCH, epochs=2, tuples=12_000)
        dundi_p = TrainConfig(DATASET, ARCH, epochs=1, tuples=12_000)
    else:
        native = TrainConfig(DATASET, ARCH, epochs=10)
        dundi_r = TrainConfig(DATASET, ARCH, epochs=6, tuples=60_000)
        dundi_p = TrainConfig(DATASET, ARCH, epochs=3, tuples=60_000)
    return native, dundi_r, dundi_p


def _done(run_dir: Path, cfg: TrainConfig) -> bool:
    """A stage is done when its run exists with exactly this configuration."""
    if not (run_dir / RUN_FILE).exists():
        return False
    return read_meta(run_dir).get("config") == json_config(cfg)  # as JSON gives it back (lists)


def table_markdown(rows: list[dict]) -> str:
    lines = [f"Accuracy on the {DATASET} test split (two-step classification, m = min(3, n), k = 5).",
             "",
             "| Model | n = 1 | n = 10 | n = 20 |", "|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[str(n)] * 100:.2f}%" if row.get(str(n)) is not None else "N/A" for n in N_VALUES]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(out: Path, data_dir: str | None = None, quick: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    print(f"[1/6] dataset {DATASET}")
    fetch(DATASET, data_dir=data_dir)
    native_cfg, r_cfg, p_cfg = _budgets(quick)
    native_dir, r_dir, p_dir = out / "native-lenet5", out / "dundi-R3", out / "dundi-P3"

    print("[2/6] native LeNet-5 (Model3)")
    if not _done(native_dir, native_cfg):
        train_native_run(native_cfg, native_dir, data_dir, progress)
    print("[3/6] DunDi_R3 (whole Distance NN trained)")
    if not _done(r_dir, r_cfg):
        train_dundi_run(r_cfg, r_dir, None, data_dir, progress)
    print("[4/6] DunDi_P3 (frozen native backbone, Embedding module trained)")
    if not _done(p_dir, p_cfg):
        train_dundi_run(p_cfg, p_dir, str(native_dir), data_dir, progress)

    print("[5/6] oracle indexes and Table 1")
    native_acc = classify_split(native_dir, data_dir=data_dir)
    rows = [{"model": "Native Model3 (LeNet-5)", "1": native_acc["accuracy"]}]
    for name, run_dir in (("DunDi_R3", r_dir), ("DunDi_P3", p_dir)):
        if index_version(read_meta(run_dir)) is None:
            build_index(run_dir, n=max(N_VALUES), seed=0, data_dir=data_dir)
        row = {"model": name}
        for n in N_VALUES:
            row[str(n)] = classify_split(run_dir, TwoStepRule(n), data_dir=data_dir)["accuracy"]
        rows.append(row)
    table = table_markdown(rows)
    print(table)
    summary = {"dataset": DATASET, "test_count": native_acc["count"], "quick": quick, "rows": rows}
    atomic_write_text(out / "table1.md", table)
    atomic_write_json(out / "table1.json", summary)

    print("[6/6] adversarial evaluation (transfer and adaptive) and report")
    report = demo_report(native_dir, {"DunDi_R3": r_dir, "DunDi_P3": p_dir}, out, data_dir,
                         quick=quick, progress=progress)
    return {"report": str(report["report"]),"dataset": DATASET, "native_accuracy": rows[0]["1"],
            **{f"{r['model']}_n{n}": r[str(n)] for r in rows[1:] for n in N_VALUES},
            "table": str(out / "table1.md")}


__all__ = ["run_demo", "table_markdown"]


def demo_report(native_dir: str | os.PathLike, dundi_dirs: dict[str, str | os.PathLike] | list,
                out: str | os.PathLike, data_dir: str | None = None, quick: bool = False,
                progress: bool = True, log=print, limit: int | None = None,
                steps: int | None = None) -> dict[str, Any]:
    """The end of `dundi demo`: evaluate every DunDi run of the demo in this process (no Ray)
    under the paper's transfer protocol (FGSM, iFGSM-a, iFGSM-b, JSMA at their paper settings)
    and the adaptive threat model (FGSM and PGD, white-box on DunDi's score), then write the
    report to ``out/report``.

    ``dundi_dirs``: {display name: run dir} or a list of run dirs. Each run's evaluation goes
    to ``out/eval-<name>``; a rerun continues from its finished shards. ``quick`` evaluates 64
    test samples, else 200 (``limit`` overrides; ≈1 min per run and 64 samples on 2 cores); ``steps`` overrides the attacks' iterations
    (default: the paper's 50)."""
    from dundi.evaluation.config import PAPER_ATTACKS, EvalConfig
    from dundi.evaluation.evaluate import evaluate_local

    out = Path(out)
    runs = dundi_dirs.items() if isinstance(dundi_dirs, dict) else [(Path(p).name, p) for p in dundi_dirs]
    limit = limit or (64 if quick else 200)
    results = []
    for name, run_dir in runs:
        target = out / f"eval-{slug(name)}"
        for threat, attacks in (("transfer", list(PAPER_ATTACKS)), ("adaptive", ["fgsm", "pgd"])):
            log(f"  evaluating {name}: {threat} threat model, {', '.join(attacks)}, {limit} test samples")
            cfg = EvalConfig(run=str(run_dir), native=str(native_dir), attacks=attacks, threats=[threat],
                             limit=limit, steps=steps, data_dir=data_dir)
            evaluate_local(cfg, target, progress=progress, log=log)
        results.append(target)
    report = write_report(results, out / "report")
    return {"report": report["report"], "plots": [str(out / "report" / p) for p in report["plots"]],
            "evaluations": [str(p) for p in results]}

