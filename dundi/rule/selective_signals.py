"""Signals of selective classification from what the two-step rule already computes, and the
pixel statistics that survive the shifts a scan goes through.

Model signals (Geifman & El-Yaniv's selective classification; the Deep k-NN credibility of
Papernot & McDaniel, on DunDi's own nearest neighbours):

- the fine-score margin: how much nearer, per oracle, the answer's n oracles are than the
  runner-up's among the classes step 1 kept (small: the rule nearly answered otherwise);
- the agreement: how many of the n oracles nearest the embedding, among the kept classes'
  oracles, belong to the answer (DkNN's nonconformity is n minus this).

Pixel signals, each blind to contrast, brightness and pixel noise, which do not change what a
digit is (docs/results/abstain: the mean pixel value and the plain mid-grey share withhold
digits at 70 % contrast, with noise or on a brighter background, that the model reads well):

- the range (brightest minus darkest pixel): an image spanning less than BLANK_RANGE holds no
  stroke at all (blank, white or constant images) and is never answered;
- the background share: the share of pixels of the image, scaled to its own range, that lie
  above its middle after a 3x3 median (ink on a dark background: small; an inverted digit,
  a photograph or a garment: large);
- the smooth grey share: the share of mid-grey pixels of that same median-filtered, rescaled
  image (noise and photographs: large; a digit, however faint or noisy: small).

All are computed row by row, so whether an image abstains never depends on its batch.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BLANK_RANGE = 0.1   # an image whose pixels span less than this holds no stroke: never answered
SMOOTH_BAND = (0.2, 0.8)  # "mid-grey" on the rescaled, median-filtered image


def fine_margin(fine_scores: np.ndarray, labels_pos: np.ndarray, n: int) -> np.ndarray:
    """(B,) the answer's fine score minus the best other kept class's, over n: how much nearer
    per oracle (in the rule's distance) the answer is. +inf where step 1 kept one class."""
    fine = np.asarray(fine_scores, np.float64)
    rows = np.arange(len(fine))
    best = fine[rows, labels_pos]
    others = fine.copy()
    others[rows, labels_pos] = -np.inf
    runner = others.max(axis=1) if fine.shape[1] > 1 else np.full(len(fine), -np.inf)
    return (best - runner) / n


def agreement(embeddings: np.ndarray, kept: np.ndarray, labels: np.ndarray, oracles: np.ndarray,
              mask: np.ndarray) -> np.ndarray:
    """(B,) how many of the n oracles nearest each embedding, among the kept classes' oracles
    (``oracles`` (C, n, D) padded, ``mask`` (C, n) the real ones), belong to the answer.
    Distances in float64, ties broken by oracle order (the sort is stable)."""
    z = np.asarray(embeddings, np.float64)
    n = oracles.shape[1]
    out = np.zeros(len(z), np.int64)
    for i in range(len(z)):
        classes = kept[i][kept[i] >= 0]
        cand = oracles[classes].astype(np.float64)                   # (k, n, D)
        d = ((cand - z[i]) ** 2).sum(-1)
        d = np.where(mask[classes], d, np.inf).ravel()
        owner = np.repeat(classes, n)
        nearest = np.argsort(d, kind="stable")[:n]
        nearest = nearest[np.isfinite(d[nearest])]
        out[i] = int((owner[nearest] == labels[i]).sum())
    return out


def _rescaled_median(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 3x3-median-filtered images scaled to their own range [0, 1], (B, H*W), and each
    image's range (B,); a blank image (range 0) scales to all zeros."""
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    lo, hi = flat.min(1), flat.max(1)
    span = hi - lo
    side = images.shape[-1]
    med = ndimage.median_filter(np.asarray(images, np.float64).reshape(len(images), -1, side),
                                size=(1, 3, 3), mode="constant", cval=0.0).reshape(len(images), -1)
    scaled = (med - lo[:, None]) / np.where(span > 0, span, 1.0)[:, None]
    return np.clip(scaled, 0, 1), span


def pixel_signals(images: np.ndarray) -> dict[str, np.ndarray]:
    """(B,) range, background share and smooth grey share of each image."""
    scaled, span = _rescaled_median(images)
    lo, hi = SMOOTH_BAND
    return {"range": span,
            "background": (scaled > 0.5).mean(1),
            "smooth_grey": ((scaled > lo) & (scaled < hi)).mean(1)}


__all__ = ["BLANK_RANGE", "SMOOTH_BAND", "fine_margin", "agreement", "pixel_signals"]
