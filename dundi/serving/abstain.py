"""Calibrating the abstain rule on held-out data.

An input unlike anything the run was trained on (another dataset, noise, an inverted image)
is one the oracle database says nothing about: the service answers "unknown" instead of the
nearest class. Each signal of the rule (SIGNALS) gets a threshold from held-out,
in-distribution images, set together so that a stated share of clean inputs (1 % by default)
abstains; `dundi index calibrate` stores the rule with the index metadata and `dundi serve`
serves it by default (docs/results/abstain).

Held-out data (:func:`dundi.run.pipeline.held_out_images`): the validation part of the run's
training split, minus any image that is itself an oracle. A run trained without a validation
part cannot be calibrated: the test split stays untouched. The calibrated rule is stored in
run.json with the index it was measured on (:func:`save_calibration`, :mod:`dundi.rule.abstain_store`).
"""

from __future__ import annotations

import os

import numpy as np

from dundi.errors import DundiError
from dundi.rule.abstain_signals import (  # noqa: F401 (levels, signal_scales: re-exported)
    ABSTAIN_SIGNALS,
    abstain_flags,
    conformal_level,
    levels,
    signal_scales,
    signal_values,
)
from dundi.rule.abstain_store import CALIBRATION_LIMIT, FALSE_ABSTAIN_RATE, calibration_fields, stored_calibration
from dundi.rule.selective_signals import BACKGROUND_FLOOR, BLANK_RANGE
from dundi.run.pipeline import held_out_images
from dundi.run.shape_fit import ensure_shape_basis as fit_shape_basis
from dundi.run.storage import load_shape_basis, update_live_oracle
from dundi.serving.model import LoadedModel

# --- the abstain rule served by default: four signals calibrated together ------------------
#
# Measured in docs/results/abstain: the nearest-oracle distance alone flags few inverted
# digits and almost no uniform noise (noise embeds near the middle of the oracle cloud,
# closer to some oracle than many real digits are). Three further signals cover them: the
# embedding's norm (noise and inverted digits excite the trained filters weakly and land
# near the origin, on some runs), and two input statistics that need no model at all — the
# share of mid-grey pixels (neither near black nor near white: digits are nearly binary,
# noise and photographs are not) and the mean pixel value (an inverted digit is mostly
# white). Their thresholds are set together so that the union abstains on the stated share
# of held-out clean images.

SIGNALS = ABSTAIN_SIGNALS


def _threshold(values: np.ndarray, field: str, depth: int) -> float:
    """The threshold beyond which at most ``depth`` calibration values lie: the
    (depth+1)-th most extreme value (strictly beyond it abstains)."""
    ordered = np.sort(values)[::-1] if SIGNALS[field][1] > 0 else np.sort(values)
    return float(ordered[min(depth, len(ordered) - 1)])


def _deepen(values: dict[str, np.ndarray], rate: float) -> dict[str, int]:
    """Per signal, how many calibration values lie beyond its threshold: all signals at one
    common depth first (no signal favoured), then one step deeper at a time, in turn, while
    the union stays within ``rate``."""
    def union(d: dict[str, int]) -> float:
        return float(abstain_flags(values, {f: _threshold(values[f], f, j) for f, j in d.items()}).mean())

    depth = dict.fromkeys(values, 0)
    while union({f: j + 1 for f, j in depth.items()}) <= rate:
        depth = {f: j + 1 for f, j in depth.items()}
    grown = True
    while grown:
        grown = False
        for f in values:
            trial = {**depth, f: depth[f] + 1}
            if union(trial) <= rate:
                depth, grown = trial, True
    return depth


# The rule calibrated by default (docs/results/abstain): the nearest-oracle distance, the
# fine-score margin and the oracle agreement -- what the two-step rule computes -- and the
# shape signal (dundi.rule.shape_signal, where the run has its basis: garments, letters and
# textures on a black page) withheld together above one common standardized level
# (selective_thresholds); the mean pixel value
# only beyond anything held-out clean digits reach (EXTREMES: inverted digits, noise, white or
# bright backgrounds, on which these runs answer badly); the blank guard at a fixed range; and
# the background guard beyond both the held-out digits' largest background level and a floor
# (FLOORS: fog, grey or bright pages, photographs filling the frame).
# LEGACY_FIELDS: the four signals served before, calibrated as before (legacy_thresholds).
SELECTIVE_FIELDS = ("abstain_threshold", "abstain_min_margin", "abstain_min_agree", "abstain_max_shape")
EXTREMES = ("abstain_max_mean",)
LEGACY_FIELDS = ("abstain_threshold", "abstain_min_norm", "abstain_max_grey", "abstain_max_mean")
GUARDS = {"abstain_min_range": BLANK_RANGE}  # fixed, not calibrated: no stroke, no digit
FLOORS = {"abstain_max_background": BACKGROUND_FLOOR}  # the held-out extreme, at least this


def rule_values(model: LoadedModel, images: np.ndarray):
    """The rule's result on ``images`` and every abstain signal's values."""
    emb = model.run.embed(images, model.embed_batch)
    r = model.run.oracle.classify(emb, model.rule)
    return r, signal_values(images, emb, r.nearest_distance, r, model.run.oracle, model.rule.n, model.shape)


def ensure_shape_basis(model: LoadedModel, data_dir: str | None = None) -> None:
    """Give a loaded run its shape basis where it has none (a run indexed before the shape
    signal existed): fitted on the training part of its train split (never the held-out part
    calibration reads), written beside the run and recorded in run.json, so every replica
    serving it reads the same one. `dundi index calibrate` calls it; a service does not."""
    if model.shape is None:
        model.run.meta = fit_shape_basis(model.run.path, data_dir)
        model.shape = load_shape_basis(model.run.path, model.run.meta)


def guard_thresholds(values: dict[str, np.ndarray], extremes: tuple[str, ...]) -> dict[str, float]:
    """GUARDS, each signal of ``extremes`` at the most extreme held-out value (only what no
    clean held-out digit reaches is withheld), and each of FLOORS at the larger of that value and
    its floor (held-out MNIST digits all have background 0: a threshold at 0 would withhold any
    scan with the faintest grey page)."""
    out = dict(GUARDS)
    for f in extremes:
        v = np.asarray(values[f], np.float64)
        out[f] = float(v.max() if SIGNALS[f][1] > 0 else v.min())
    for f, floor in FLOORS.items():
        out[f] = max(float(np.max(values[f])), floor)
    return out


def _summary(values: dict[str, np.ndarray], thresholds: dict) -> dict:
    return {"thresholds": {**OFF, **thresholds},
            "abstain_rate": float(abstain_flags(values, thresholds).mean()),
            "per_signal_rate": {f: float(abstain_flags(values, {f: t}).mean())
                                for f, t in thresholds.items() if t is not None}}


def selective_thresholds(values: dict[str, np.ndarray], rate: float,
                         fields: tuple[str, ...] = SELECTIVE_FIELDS,
                         extremes: tuple[str, ...] = EXTREMES) -> dict:
    """A conformal calibration on held-out clean ``values``: the guards first, then one common
    level L, the smallest at which the union of the guards and "some signal of ``fields`` lies
    above level L" withholds at most ``rate`` of the held-out images (the split-conformal
    quantile of the rule's nonconformity). Served as one threshold per signal: median + L x
    spread, turned back to the signal's own direction."""
    guards = guard_thresholds(values, extremes)
    guarded = abstain_flags(values, guards)
    scales = signal_scales(values, tuple(f for f in fields if f in values))  # the shape signal: with a basis
    level = conformal_level(levels(values, scales), guarded, rate)
    best = {f: SIGNALS[f][1] * (mid + level * spread) for f, (mid, spread) in scales.items()}
    # a lower bound below 0 never fires on a signal that is never negative (margin, agreement):
    # served as 0, which withholds the same and is a valid setting (ModelConfig: non-negative)
    best = {f: max(t, 0.0) if SIGNALS[f][1] < 0 else t for f, t in best.items()}
    out = _summary(values, {**best, **guards})
    return {**out, "level": level, "scales": {f: list(v) for f, v in scales.items()}}


def legacy_thresholds(values: dict[str, np.ndarray], rate: float,
                      fields: tuple[str, ...] = LEGACY_FIELDS) -> dict:
    """The four signals served before, each an order statistic of the held-out values, deepened
    in turn (:func:`_deepen`) while their union withholds at most ``rate``; no guard."""
    chosen = {f: values[f] for f in fields}
    depth = _deepen(chosen, rate)
    return {**_summary(values, {f: _threshold(chosen[f], f, j) for f, j in depth.items()}), "depth": depth}


def calibrate_rule(model: LoadedModel, images: np.ndarray, labels: np.ndarray | None = None,
                   rate: float = 0.01, legacy: bool = False, fields: tuple[str, ...] | None = None) -> dict:
    """The abstain rule calibrated on held-out clean ``images`` to withhold at most ``rate`` of
    them: :func:`selective_thresholds` (default), or with ``legacy`` the four signals served
    before (:func:`legacy_thresholds`; ``fields``: only these of them), with the figures
    behind them."""
    if not 0.0 < rate < 1.0:
        raise DundiError(f"the false-abstain rate must be in (0, 1), got {rate}")
    if len(images) == 0:
        raise DundiError("no held-out images to calibrate the abstain rule on")
    r, values = rule_values(model, images)
    if legacy or fields is not None:
        cal = legacy_thresholds(values, rate, LEGACY_FIELDS if fields is None else tuple(fields))
    else:
        cal = selective_thresholds(values, rate)
    flags = abstain_flags(values, cal["thresholds"])
    out = {**cal, "rate": rate, "count": int(len(images)), "n": model.rule.n, "m": model.rule.m,
           "k": model.rule.k}
    if labels is not None:
        correct = r.labels == labels
        out["accuracy"] = float(correct.mean())
        out["accuracy_when_answering"] = float(correct[~flags].mean()) if (~flags).any() else float("nan")
    return out


DEFAULT_RATE = FALSE_ABSTAIN_RATE  # served by default: 1 % of clean held-out images withheld
OFF = {field: None for field in SIGNALS}


def abstain_settings(model: LoadedModel, choice: float | str | None, rate: float | None = None,
                     data_dir: str | None = None, limit: int | None = CALIBRATION_LIMIT) -> tuple[dict, str]:
    """The abstain fields of ModelConfig for a loaded model, and one line saying where they
    come from. ``choice``: "none" (never abstain), a number (nearest-oracle distance only), or
    None — the calibrated rule: the one `dundi index calibrate` stored for this n, m, k, else
    one calibrated now on held-out data at ``rate`` (default DEFAULT_RATE). A given ``rate``
    always calibrates anew."""
    if choice == "none":
        return dict(OFF), "abstain off (--abstain-threshold none)"
    if choice is not None:
        return {**OFF, "abstain_threshold": float(choice)}, \
            f"abstain when the nearest oracle is farther than {float(choice):g} (given)"
    stored = (stored_calibration(model.run.meta, model.rule, model.info.index_sha256)
              if rate is None else None)
    if stored:
        return dict(stored["thresholds"]), (f"abstain rule calibrated by `dundi index calibrate`: "
                                            f"{stored['abstain_rate']:.2%} false abstains on {stored['source']}")
    images, labels, source = held_out_images(model.run, data_dir, limit)
    cal = calibrate_rule(model, images, labels, DEFAULT_RATE if rate is None else rate)
    unshaped = "" if model.shape is not None else ", without the shape signal: the run has no shape basis"
    return dict(cal["thresholds"]), (f"abstain rule calibrated now: {cal['abstain_rate']:.2%} false "
                                     f"abstains on {source}{unshaped} (store it with `dundi index calibrate "
                                     f"{model.run.path}`)")


def save_calibration(run_dir: str | os.PathLike, calibration: dict, source: str, index_sha: str) -> None:
    """Store an abstain rule calibrated on the index file ``index_sha`` with the live index's
    metadata in run.json, under the run's write lock. Every index change (build, add, remove)
    replaces that metadata, and the rule names the index file it was measured on, so a
    threshold never outlives the oracles it was measured against."""
    if not update_live_oracle(run_dir, index_sha, **calibration_fields(calibration, source, index_sha)):
        raise DundiError(f"the oracle index of {run_dir} changed while calibrating (or a pinned "
                         f"version was calibrated): calibrate the live index again")
