"""Per-image answers for a user's own image files, and the formats they are written in.

`dundi classify RUN IMAGES...` exists so that a user can point a run at their files and read
what it says about each one: the label and its name, the classes it weighed with their
scores, how far the nearest oracle is, whether the run would abstain, and — for certifiable
runs — the radius within which the answer provably holds. A DunDi run answers through the
same :class:`dundi.serving.model.LoadedModel` as the HTTP service, so the file answers and
the service's answers cannot drift apart; a native run answers with the softmax of its
logits.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from dundi.errors import DundiError
from dundi.files import atomic_write_text
from dundi.rule.params import TwoStepRule
from dundi.run.directory import Run
from dundi.serving.settings import ANSWER_FORMATS

if TYPE_CHECKING:
    from dundi.serving.model import LoadedModel


def _native_rows(run: Run, images: np.ndarray, rule: TwoStepRule) -> tuple[list[dict], str]:
    from dundi.nets.inference import forward_batched

    r = run.classify(images, rule)  # labels and top-k by logit, ties to the lower class
    full = forward_batched(run.model, images).astype(np.float64)  # softmax needs every class
    probs = np.exp(full - full.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    names = run.class_names
    rows = [{"label": int(lab), "class_name": names[lab], "topk_classes": [int(c) for c in top],
             "topk_scores": [float(probs[i, c]) for c in top]}
            for i, (lab, top) in enumerate(zip(r.labels, r.topk_classes))]
    return rows, "softmax probability"


def _dundi_rows(model: "LoadedModel", images: np.ndarray) -> tuple[list[dict], str]:
    p = model.predict(images)
    names = model.info.class_names
    rows = []
    for i in range(len(p)):
        keep = p.kept_classes[i] >= 0
        row = {"label": None if p.abstained[i] else int(p.labels[i]),
               "class_name": "unknown" if p.abstained[i] else names[p.labels[i]],
               "nearest_label": int(p.labels[i]),
               "topk_classes": [int(c) for c in p.kept_classes[i][keep]],
               "topk_scores": [float(s) for s in p.fine_scores[i][keep]],
               "nearest_distance": float(p.nearest_distance[i]), "abstained": bool(p.abstained[i])}
        if p.certified_radius is not None:
            rad = float(p.certified_radius[i])
            row["certified_radius"] = None if math.isnan(rad) else rad
        rows.append(row)
    return rows, f"fine score (summed -{model.info.metric} distance to {model.rule.n} oracles)"


def classify_files(run: "Run | LoadedModel", images: np.ndarray, files: Sequence[str],
                   rule: TwoStepRule | None = None) -> tuple[list[dict], dict]:
    """Answers for images read from ``files`` (:func:`dundi.run.image_files.read_images`) by a
    native :class:`Run` (softmax top ``rule.k``) or a DunDi run loaded as the service loads it
    (:class:`LoadedModel`: its rule and abstain rule). Returns one dict per image, file
    first, and what the scores mean."""
    meta = run.meta if isinstance(run, Run) else run.run.meta
    if isinstance(run, Run):
        rows, score = _native_rows(run, images, rule or TwoStepRule())
    else:
        rows, score = _dundi_rows(run, images)
    info = {"kind": meta["kind"], "dataset": meta["dataset"], "count": len(rows), "score": score}
    return [{"file": f, **r} for f, r in zip(files, rows)], info


def _cell(value: Any) -> str:
    """A value as table/CSV text: floats to 4 decimals, lists space-separated, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(_cell(v) for v in value)
    return str(value)


def _topk_text(row: dict) -> str:
    return "  ".join(f"{c}:{s:.3f}" for c, s in zip(row["topk_classes"], row["topk_scores"]))


def format_table(rows: list[dict], info: dict) -> str:
    """An aligned table for people: one line per image, top-k as class:score pairs."""
    columns = [c for c in rows[0] if c not in ("topk_classes", "topk_scores", "nearest_label")] if rows else []
    columns.insert(3 if len(columns) > 3 else len(columns), "top-k")
    body = [[_topk_text(r) if c == "top-k" else _cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    numeric = {"label", "nearest_distance", "certified_radius"}
    lines = ["  ".join(c.rjust(w) if c in numeric else c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    for b in body:
        lines.append("  ".join(v.rjust(w) if c in numeric else v.ljust(w)
                               for c, v, w in zip(columns, b, widths)).rstrip())
    lines.append(f"top-k: class:score, where score is the {info['score']}")
    return "\n".join(lines)


def format_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["file"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({key: _cell(v) if isinstance(v, list) or v is None else v for key, v in r.items()})
    return buf.getvalue()


def format_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_parquet(rows: list[dict], out: str | os.PathLike) -> None:
    """Rows as a Parquet file (lists as list columns), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_answers(rows: list[dict], info: dict, fmt: str, out: str | None) -> str | None:
    """Write the answers in ``fmt`` to ``out`` (atomically), or return the text to print."""
    if fmt not in ANSWER_FORMATS:
        raise DundiError(f"unknown format {fmt!r}: choose one of {', '.join(ANSWER_FORMATS)}")
    if fmt == "parquet":
        if not out:
            raise DundiError("--format parquet writes a file: give --out FILE.parquet")
        write_parquet(rows, out)
        return None
    text = {"table": lambda: format_table(rows, info) + "\n", "csv": lambda: format_csv(rows),
            "jsonl": lambda: format_jsonl(rows)}[fmt]()
    if out:
        atomic_write_text(out, text)
        return None
    return text
