"""Certificates beside an adversarial evaluation: certified accuracy per eps on the very samples
the attacks ran on, and the soundness checks that tie the two together.

For a run whose rule can be certified (``metric = sqeuclidean``, docs/certification.md),
``dundi evaluate`` also writes ``certified.parquet`` into the evaluation directory: one row per
evaluated sample with its certified radius and, for every L∞ eps the evaluation attacked at,
whether the rule provably keeps the true label in that ball. Then, per sample and eps:

- no attack row at a budget up to eps may show a misclassification of a certified sample —
  if one does, the certificate (or the attack's bookkeeping) is wrong, and the evaluation
  fails loudly instead of printing a number;
- certified accuracy ≤ worst-case empirical robust accuracy ≤ clean accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dundi.errors import DundiError
from dundi.evaluation.results import read_evaluation, read_results

CERTIFIED_FILE = "certified.parquet"


def linf_eps(table: pa.Table) -> list[float]:
    """The distinct finite L∞ budgets of an evaluation's rows."""
    norm = table.column("norm").to_numpy(zero_copy_only=False)
    eps = table.column("eps").to_numpy()
    return sorted({float(e) for e in eps[(norm == "Linf") & np.isfinite(eps)]})


def certify_evaluation(out: str | os.PathLike) -> pa.Table | None:
    """Compute (or reuse) the certificates of an evaluation's samples; None when the run's rule
    cannot be certified. Written atomically, keyed by the evaluation's fingerprint and eps."""
    from dundi.evaluation.config import EvalConfig
    from dundi.evaluation.shard import Evaluator
    from dundi.run.directory import Run
    from dundi.run.storage import read_meta

    out = Path(out)
    evaluation = read_evaluation(out)
    cfg = EvalConfig(**evaluation["config"])
    if read_meta(cfg.run).get("config", {}).get("metric") != "sqeuclidean":
        return None  # decided from run.json: an uncertifiable run is not loaded again
    run = Run.load(cfg.run)
    eps = linf_eps(read_results(out))
    key = f"{evaluation['fingerprint']}|{','.join(f'{e:g}' for e in eps)}".encode()
    path = out / CERTIFIED_FILE
    if path.exists():
        old = pq.read_table(path)
        if (old.schema.metadata or {}).get(b"dundi.key") == key:
            return old
    images, labels, ids = Evaluator.load_samples(cfg, evaluation["dataset"], read_meta(cfg.run))
    certifier = run.certifier(cfg.rule)
    found = certifier.batched(images, labels, eps=eps, radius=True)
    columns: dict[str, Any] = {"sample_id": pa.array(ids, pa.int64()),
                               "label": pa.array(labels, pa.int64()),
                               "radius": pa.array(found["radius"], pa.float64())}
    for i, e in enumerate(eps):
        columns[f"certified@{e:g}"] = pa.array(found["certified"][:, i], pa.bool_())
    table = pa.table(columns).replace_schema_metadata({b"dundi.key": key, b"dundi.n": str(certifier.rule.n).encode()})
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return table


def check_certificates(rows: pa.Table, certified: pa.Table) -> list[dict[str, Any]]:
    """Per L∞ eps: clean, worst-case robust and certified accuracy on the same samples.

    Raises DundiError if an attack row misclassifies a sample certified at a budget at least the
    row's, or if certified > robust or robust > clean (which the first check implies)."""
    cert_ids = certified.column("sample_id").to_numpy()
    position = {int(s): i for i, s in enumerate(cert_ids)}
    sid = rows.column("sample_id").to_numpy()
    label = rows.column("label").to_numpy()
    clean = rows.column("dundi_clean").to_numpy() == label
    adv_ok = rows.column("dundi_adv").to_numpy() == label
    norm = rows.column("norm").to_numpy(zero_copy_only=False)
    eps = rows.column("eps").to_numpy()
    pos = np.array([position.get(int(s), -1) for s in sid])
    if (pos < 0).any():
        raise DundiError("the certificates do not cover every evaluated sample; rerun `dundi evaluate`")
    figures = []
    for e in linf_eps(rows):
        cert = certified.column(f"certified@{e:g}").to_numpy(zero_copy_only=False)
        within = (norm == "Linf") & (eps <= e)
        flipped = within & cert[pos] & ~(adv_ok & clean)
        if flipped.any():
            bad = sorted({int(s) for s in sid[flipped]})[:10]
            raise DundiError(f"soundness violation: {int(flipped.sum())} attack rows misclassify samples "
                             f"certified at eps {e:g} (sample ids {bad}); the certificate cannot be "
                             f"trusted — please report this evaluation")
        robust = np.ones(len(cert_ids), bool)
        np.logical_and.at(robust, pos[within], (adv_ok & clean)[within])
        clean_by_sample = np.ones(len(cert_ids), bool)
        np.logical_and.at(clean_by_sample, pos, clean)
        figure = {"eps": e, "count": int(len(cert_ids)), "clean_accuracy": float(clean_by_sample.mean()),
                  "robust_accuracy": float((robust & clean_by_sample).mean()),
                  "certified_accuracy": float(cert.mean())}
        if not figure["certified_accuracy"] <= figure["robust_accuracy"] <= figure["clean_accuracy"]:
            raise DundiError(f"certified ≤ robust ≤ clean accuracy fails at eps {e:g}: {figure}")
        figures.append(figure)
    return figures


def certified_summary(out: str | os.PathLike) -> list[dict[str, Any]] | None:
    """The per-eps figures of an evaluation that has certificates (None when it has none)."""
    path = Path(out) / CERTIFIED_FILE
    if not path.exists():
        return None
    return check_certificates(read_results(out), pq.read_table(path))


def certified_curve(out: str | os.PathLike, eps_max: float, points: int = 80) -> list[tuple[float, float]] | None:
    """Certified accuracy against L∞ eps from each sample's certified radius (the field's
    curve): at ``points`` eps in (0, eps_max], the fraction of the evaluated samples whose
    true label is proven at that radius. Radii come from a bisection rounded down, so the
    curve is a lower bound; at an attacked eps the exact certificate (``certified@eps``) can
    sit a resolution step above it. None when the evaluation has no certificates."""
    path = Path(out) / CERTIFIED_FILE
    if not path.exists() or eps_max <= 0:
        return None
    radii = pq.read_table(path, columns=["radius"]).column("radius").to_numpy()
    grid = np.linspace(0.0, eps_max, points + 1)[1:]
    return [(float(e), float((radii >= e).mean())) for e in grid]


__all__ = ["CERTIFIED_FILE", "certify_evaluation", "check_certificates", "certified_summary", "certified_curve",
           "linf_eps"]
