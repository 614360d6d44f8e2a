"""`dundi demo`: the paper's Table 1 for one backbone on mnist-10k, end to end, on 2 CPU cores.

fetch mnist-10k → native LeNet-5 (Model3) → DunDi_R3 and DunDi_P3 → oracle index (n=20)
→ two-step test accuracy for n = 1, 10, 20 → the paper's attacks (transfer) and FGSM/PGD
(adaptive) on a test sample → `dundi report` into out/report/. Each finished stage is kept: a demo that is
killed and started again continues where it stopped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dundi.artifacts import RUN_FILE, atomic_write_json, atomic_write_text, index_version, read_meta
from dundi.data import fetch
from dundi.report import demo_report
from dundi.pipeline import build_index, classify_split, train_dundi_run, train_native_run
from dundi.train import TrainConfig
from dundi.rule import KEPT_CLASSES, coarse_default

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
    return read_meta(run_dir).get("config") == dataclasses.asdict(cfg)


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
            row[str(n)] = classify_split(run_dir, n=n, m=coarse_default(n), k=KEPT_CLASSES, data_dir=data_dir)["accuracy"]
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
