"""The abstain rule's signals: what each measures, and their values for a batch.

Core, not serving: the certificate (:mod:`dundi.robustness.certificate`) bounds every signal over an
L∞ ball, so "certified" covers the answer being withdrawn as "unknown" too. Thresholds are
calibrated and stored by :mod:`dundi.serving.abstain`. Every value is computed row by row in
one fixed order (:func:`dundi.rule.exact.fixed_sum`), so whether an image abstains never
depends on the other images of its batch.
"""

from __future__ import annotations

import numpy as np

from dundi.rule.exact import fixed_sum
from dundi.rule.params import TwoStepResult
from dundi.rule.selective_signals import agreement, background_level, fine_margin, pixel_range
from dundi.rule.shape_signal import ShapeBasis, shape_distance

# ModelConfig field -> (what it measures, +1: abstain above the threshold / -1: below).
ABSTAIN_SIGNALS = {"abstain_threshold": ("nearest-oracle distance", 1),
                   "abstain_min_norm": ("embedding norm", -1),
                   "abstain_max_grey": ("share of mid-grey pixels", 1),
                   "abstain_max_mean": ("mean pixel value", 1),
                   # the selective signals (dundi.rule.selective_signals)
                   "abstain_min_margin": ("fine-score margin", -1),
                   "abstain_min_agree": ("nearest oracles agreeing with the answer", -1),
                   "abstain_min_range": ("pixel range (blank guard)", -1),
                   "abstain_max_background": ("background level: 25th-percentile pixel (background guard)", 1),
                   "abstain_max_shape": ("distance from the training digits' shape subspace (shape signal)", 1)}
# The signals the certificate bounds over the L-inf ball (dundi.robustness.certificate); an
# answer withheld by any other signal is served outside the certified radius: the radius
# promises the label, and the withholding only by these. The background guard and the shape
# signal are such signals (ModelInfo.uncertified_signals names them; dundi.rule.selective_signals
# and dundi.rule.shape_signal say why), as is the oracle agreement.
CERTIFIED_SIGNALS = ("abstain_threshold", "abstain_min_norm", "abstain_max_grey", "abstain_max_mean",
                     "abstain_min_margin", "abstain_min_range")
GREY_BAND = (0.1, 0.9)  # a pixel strictly inside is "mid-grey"


def grey_share(images: np.ndarray) -> np.ndarray:
    """(B,) share of each image's pixels strictly inside GREY_BAND (a count over the pixel
    count: exact)."""
    lo, hi = GREY_BAND
    flat = images.reshape(len(images), -1)
    return ((flat > lo) & (flat < hi)).sum(axis=1) / flat.shape[1]


def mean_pixel(images: np.ndarray) -> np.ndarray:
    """(B,) mean pixel value, float64, summed in fixed order."""
    flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    return fixed_sum(flat) / flat.shape[1]


def embedding_norm(embeddings: np.ndarray) -> np.ndarray:
    """(B,) Euclidean norm of each embedding, float64, summed in fixed order."""
    z = np.asarray(embeddings, dtype=np.float64)
    return np.sqrt(fixed_sum(z * z))


def signal_values(images: np.ndarray, embeddings: np.ndarray, nearest_distance: np.ndarray,
                  result: TwoStepResult | None = None, oracles=None, n: int | None = None,
                  shape: ShapeBasis | None = None) -> dict[str, np.ndarray]:
    """Every abstain signal of a batch, keyed by the ModelConfig field that thresholds it.
    The margin and agreement need the rule's ``result``, the ``oracles`` index
    (:class:`dundi.rule.index.OracleIndex`) and the rule's ``n``, the shape signal the run's
    ``shape`` basis; without them they are left out."""
    values = {"abstain_threshold": np.asarray(nearest_distance, np.float64),
              "abstain_min_norm": embedding_norm(embeddings),
              "abstain_max_grey": grey_share(images),
              "abstain_max_mean": mean_pixel(images),
              "abstain_min_range": pixel_range(images),
              "abstain_max_background": background_level(images)}
    if result is not None and oracles is not None and len(result.labels):
        pos = np.argmax(result.topk_classes == result.labels[:, None], axis=1)
        values["abstain_min_margin"] = fine_margin(result.fine_scores, pos, n)
        padded, mask = oracles.padded(n)
        values["abstain_min_agree"] = agreement(embeddings, result.topk_classes, result.labels,
                                                padded, mask).astype(np.float64)
    elif result is not None or oracles is not None:
        values["abstain_min_margin"] = values["abstain_min_agree"] = np.zeros(len(images))
    if shape is not None:
        values["abstain_max_shape"] = shape_distance(shape, images)
    return values


def abstain_flags(values: dict[str, np.ndarray], thresholds: dict[str, float | None]) -> np.ndarray:
    """(B,) True where any signal with a threshold lies beyond it (None: signal off)."""
    size = len(next(iter(values.values())))
    flags = np.zeros(size, bool)
    for field, thr in thresholds.items():
        if thr is None:
            continue
        if field not in values:
            raise KeyError(f"abstain signal {field} needs the rule's result and oracles, or the shape basis")
        v = values[field]
        flags |= (v > thr) if ABSTAIN_SIGNALS[field][1] > 0 else (v < thr)
    return flags


SCALE_QUANTILES = (0.5, 0.99)  # a signal's level: (value - median) / (99th percentile - median)


def direction(field: str) -> int:
    """+1 where a larger value is more unusual, -1 where a smaller one is; a field that is no
    abstain signal (a candidate the benchmark measures, oriented larger = more unusual) is +1."""
    return ABSTAIN_SIGNALS[field][1] if field in ABSTAIN_SIGNALS else 1


def signal_scales(values: dict[str, np.ndarray], fields: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """Per signal, (median, spread) of its held-out values turned so that larger is more
    unusual: a value's level is (value - median) / spread, spread = 99th percentile - median."""
    out = {}
    for f in fields:
        v = direction(f) * np.asarray(values[f], np.float64)
        mid, top = np.quantile(v, SCALE_QUANTILES)
        out[f] = (float(mid), float(max(top - mid, 1e-12)))
    return out


def levels(values: dict[str, np.ndarray], scales: dict[str, tuple[float, float]]) -> np.ndarray:
    """(B,) the largest standardized level over the scaled signals: the rule's nonconformity."""
    return np.max([(direction(f) * np.asarray(values[f], np.float64) - mid) / spread
                   for f, (mid, spread) in scales.items()], axis=0)


def conformal_level(score: np.ndarray, guarded: np.ndarray, rate: float) -> float:
    """The split-conformal level on held-out nonconformity ``score``: the smallest L at which
    the ``guarded`` images and those scoring above L together are at most ``rate`` of them
    (the highest free scores within the budget are withheld; L is the next one down)."""
    budget = int(np.floor(rate * len(score) + 1e-9)) - int(np.sum(guarded))
    free = np.sort(np.asarray(score, np.float64)[~np.asarray(guarded, bool)])[::-1]
    if len(free) > max(budget, 0):
        return float(free[max(budget, 0)])
    return float(free.min()) - 1.0 if len(free) else 0.0


__all__ = ["ABSTAIN_SIGNALS", "CERTIFIED_SIGNALS", "GREY_BAND", "grey_share", "mean_pixel", "embedding_norm",
           "signal_values", "abstain_flags", "SCALE_QUANTILES", "direction", "signal_scales", "levels",
           "conformal_level"]
