"""Shaping a :class:`~dundi.serving.model.Prediction` into JSON answers.

Two shapes, one content. For each image:

* ``label`` — the two-step answer (the argmax of the fine scores), or "unknown" when the
  service abstains: in v2 the label is -1 and ``abstained`` is true, on /classify the label is
  null, ``class_name`` is "unknown" and ``abstained`` is true.
* ``kept_classes`` with ``coarse_scores`` — the k classes kept by step 1, best first;
* ``fine_scores`` — the step-2 scores of those k classes (same order);
* ``nearest_oracle_distance`` — Euclidean distance in embedding space to the nearest oracle
  among the kept classes' n oracles (what the abstain threshold is compared with);
* ``certified_radius`` — for runs whose rule ranks by squared Euclidean distance
  (``dundi train --certified``): the largest L∞ radius (pixels in [0, 1]) within which this
  service provably gives this same answer: the same label, as computed by the server in any
  batch, and never "unknown" (docs/certification.md); 0: not certified; null for other runs
  and for abstained answers.

Scores are summed similarities, sim = −‖a − b‖₂: higher is better. A score or class the coarse
step could not fill (only possible with the IVF shortlist on very many classes) is null / -1.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from dundi.serving.model import ABSTAIN_SIGNALS, ModelInfo, Prediction

V2_OUTPUTS = ("label", "class_name", "abstained", "kept_classes", "coarse_scores", "fine_scores",
              "nearest_oracle_distance", "certified_radius")


def _radii(pred: Prediction) -> list:
    """Per image: the certified radius, or null (uncertifiable run, abstained answer)."""
    if pred.certified_radius is None:
        return [None] * len(pred)
    return _floats(pred.certified_radius)


def _floats(arr: np.ndarray) -> list:
    """A 1-D array as JSON-safe floats: non-finite values (an unfilled coarse slot) become null."""
    arr = np.asarray(arr, dtype=np.float64)
    values = arr.tolist()
    if np.isfinite(arr).all():
        return values
    return [v if math.isfinite(v) else None for v in values]


def abstain_parameters(info: ModelInfo) -> dict:
    """The abstain rule's thresholds as answers report them (null: that signal is off), and the
    signals among them that a certified radius does not cover (served outside it, by name)."""
    return {**{f: getattr(info, f) for f in ABSTAIN_SIGNALS},
            "uncertified_signals": list(info.uncertified_signals)}


def _class_names(info: ModelInfo, labels: np.ndarray, abstained: np.ndarray) -> list[str]:
    names = info.class_names
    return ["unknown" if a else (names[c] if 0 <= c < len(names) else str(c))
            for c, a in zip(labels.tolist(), abstained.tolist())]


def v2_response(pred: Prediction, info: ModelInfo, model_name: str, request_id: str | None,
                outputs: list[str] | None) -> dict:
    """An Open Inference Protocol (v2) inference response; tensors flattened row-major."""
    n, k = pred.kept_classes.shape if pred.kept_classes.ndim == 2 else (len(pred), 0)
    labels = np.where(pred.abstained, -1, pred.labels)
    tensors = {
        "label": ("INT64", [n], lambda: labels.tolist()),
        "class_name": ("BYTES", [n], lambda: _class_names(info, pred.labels, pred.abstained)),
        "abstained": ("BOOL", [n], lambda: pred.abstained.astype(bool).tolist()),
        "kept_classes": ("INT64", [n, k], lambda: pred.kept_classes.ravel().tolist()),
        "coarse_scores": ("FP64", [n, k], lambda: _floats(pred.coarse_scores.ravel())),
        "fine_scores": ("FP64", [n, k], lambda: _floats(pred.fine_scores.ravel())),
        "nearest_oracle_distance": ("FP64", [n], lambda: _floats(pred.nearest_distance)),
        "certified_radius": ("FP64", [n], lambda: _radii(pred)),
    }
    out: dict[str, Any] = {"model_name": model_name, "model_version": info.version}
    if request_id is not None:
        out["id"] = request_id
    out["parameters"] = {"n": info.n, "m": info.m, "k": info.k, "step1": info.step1, **abstain_parameters(info)}
    out["outputs"] = [{"name": name, "datatype": tensors[name][0], "shape": tensors[name][1],
                       "data": tensors[name][2]()} for name in (outputs or V2_OUTPUTS)]
    return out


def classify_response(pred: Prediction, info: ModelInfo, model_name: str) -> dict:
    """The /classify answer: one readable record per image."""
    names = info.class_names

    def name(c: int) -> str | None:
        return names[c] if 0 <= c < len(names) else None

    labels, abstained = pred.labels.tolist(), pred.abstained.tolist()
    kept = pred.kept_classes.tolist()
    coarse = [_floats(row) for row in pred.coarse_scores]
    fine = [_floats(row) for row in pred.fine_scores]
    nearest = _floats(pred.nearest_distance)
    radii = _radii(pred)
    results = []
    for i in range(len(labels)):
        step1 = [{"class": c, "class_name": name(c), "coarse_score": s}
                 for c, s in zip(kept[i], coarse[i]) if c >= 0]
        final = sorted(({"class": c, "class_name": name(c), "fine_score": s}
                        for c, s in zip(kept[i], fine[i]) if c >= 0),
                       key=lambda r: -np.inf if r["fine_score"] is None else r["fine_score"], reverse=True)
        results.append({
            "label": None if abstained[i] else labels[i],
            "class_name": "unknown" if abstained[i] else name(labels[i]),
            "abstained": abstained[i],
            "kept_classes": step1,
            "class_scores": final,
            "nearest_oracle_distance": nearest[i],
            "certified_radius": radii[i],
        })
    return {"model_name": model_name, "model_version": info.version,
            "parameters": {"n": info.n, "m": info.m, "k": info.k, "step1": info.step1,
                           **abstain_parameters(info)},
            "results": results}


def model_metadata(info: ModelInfo, model_name: str) -> dict:
    """v2 model metadata (GET /v2/models/{name}), plus DunDi's own facts under "parameters"."""
    c, h, w = info.in_shape
    return {
        "name": model_name,
        "versions": [info.version],
        "platform": "dundi_pytorch_faiss",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, c, h, w],
                    "parameters": {"range": [0.0, 1.0], "also_accepted": ["FP64", "UINT8 (0..255, scaled by 1/255)"]}}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "class_name", "datatype": "BYTES", "shape": [-1]},
            {"name": "abstained", "datatype": "BOOL", "shape": [-1]},
            {"name": "kept_classes", "datatype": "INT64", "shape": [-1, info.k]},
            {"name": "coarse_scores", "datatype": "FP64", "shape": [-1, info.k]},
            {"name": "fine_scores", "datatype": "FP64", "shape": [-1, info.k]},
            {"name": "nearest_oracle_distance", "datatype": "FP64", "shape": [-1]},
            {"name": "certified_radius", "datatype": "FP64", "shape": [-1],
             "parameters": {"null_when": "the run is not certifiable or the answer abstained"}},
        ],
        "parameters": {**{k: v for k, v in info.to_dict().items() if k != "version"}},
    }


def dumps(obj: Any) -> bytes:
    """Compact, strict JSON (no NaN literals)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
