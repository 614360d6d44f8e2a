"""Signals of selective classification from what the two-step rule already computes, and the
pixel statistics that survive the shifts a scan goes through.

Model signals (Geifman & El-Yaniv's selective classification; the Deep k-NN credibility of
Papernot & McDaniel, on DunDi's own nearest neighbours):

- the fine-score margin: how much nearer, per oracle, the answer's n oracles are than the
  runner-up's among the classes step 1 kept (small: the rule nearly answered otherwise);
- the agreement: how many of the n oracles nearest the embedding, among the kept classes'
  oracles, belong to the answer (DkNN's nonconformity is n minus this).

The blank guard: an image whose pixels span less than BLANK_RANGE (brightest minus darkest)
holds no stroke at all (blank, white or constant images) and is never answered. The
background guard: an image whose 25th-percentile pixel lies above BACKGROUND_FLOOR (and above
every held-out clean digit's) has no dark background -- fog, a bright or grey page, noise,
inverted digits, a photograph filling the frame -- and is not answered either: a digit covers
far less than three quarters of the frame, so a digit's 25th-percentile pixel is its background
(exactly 0 on every held-out MNIST digit). Faint strokes (70 % contrast) and clipped pixel
noise (sd 0.1) leave it at 0. It is served outside the certified radius: an L∞ ball of radius
eps lifts the background by eps, so a bound over the ball would cap every radius at the floor.
Two further
pixel statistics made blind to contrast, brightness and noise (the share of background and of
mid-grey pixels of the image rescaled to its own range after a 3x3 median) were tried and
dropped: on the design corruptions they withheld blurred digits the model reads as well as
the rest and raised the area under the risk-coverage curve (docs/results/abstain).

All are computed row by row, so whether an image abstains never depends on its batch.
"""

from __future__ import annotations

import numpy as np

BLANK_RANGE = 0.1   # an image whose pixels span less than this holds no stroke: never answered
BACKGROUND_FLOOR = 0.05   # a 25th-percentile pixel above this (and above held-out digits'): no dark background
BACKGROUND_RANK = 0.25    # which order statistic of the pixels is the background level


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


def pixel_range(images: np.ndarray) -> np.ndarray:
    """(B,) brightest minus darkest pixel of each image, float64 (exact for float32 pixels)."""
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    return flat.max(1) - flat.min(1)


def background_level(images: np.ndarray) -> np.ndarray:
    """(B,) the background level: the pixel at rank floor(BACKGROUND_RANK x P) of each image's
    P pixels sorted ascending (an order statistic: exact, and the same in any batch)."""
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    rank = int(BACKGROUND_RANK * flat.shape[1])
    return np.partition(flat, rank, axis=1)[:, rank] if len(flat) else np.zeros(0)


__all__ = ["BLANK_RANGE", "BACKGROUND_FLOOR", "BACKGROUND_RANK", "fine_margin", "agreement", "pixel_range",
           "background_level"]
