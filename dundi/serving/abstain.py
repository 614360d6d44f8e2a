"""Calibrating the abstain rule on held-out data.

An input unlike anything the run was trained on (another dataset, noise, an inverted image)
is one the oracle database says nothing about: the service answers "unknown" instead of the
nearest class. Each signal of the rule (SIGNALS) gets a threshold from held-out,
in-distribution images, set together so that a stated share of clean inputs (1 % by default)
abstains; `dundi index calibrate` stores the rule with the index metadata and `dundi serve`
serves it by default (docs/results/abstain).

Held-out data: the validation part of the run's training split (the same seeded split the
training used, so the model never trained on it), minus any image that is itself an oracle.
A run trained without a validation part cannot be calibrated: the test split stays untouched.
"""

from __future__ import annotations

import numpy as np

from dundi.errors import DundiError
from dundi.abstain_signals import ABSTAIN_SIGNALS, abstain_flags, signal_values
from dundi.serving.model import LoadedModel


def held_out_images(model: LoadedModel, data_dir: str | None = None, limit: int | None = 2000
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, description) of in-distribution images the model did not train on:
    the validation part of the train split, split as training split it (after leaving out
    any held-out classes), minus the oracles. Never the test split: a threshold fitted on it
    would leave no untouched data to measure the false-abstain rate on."""
    from dundi.data import load_split
    from dundi.pipeline import run_rows
    from dundi.train import split_train_val

    meta = model.run.meta
    cfg = meta.get("config", {})
    images, labels, ids = run_rows(meta, *load_split(meta["dataset"], "train", data_dir, limit=cfg.get("limit")))
    _, va = split_train_val(labels, cfg.get("val_fraction", 0.0), cfg.get("seed", 0))
    oracle_ids = set(model.run.oracle.meta.get("ids", [])) if model.run.oracle else set()
    va = np.array([i for i in va if int(ids[i]) not in oracle_ids], dtype=np.int64)
    if not len(va):
        raise DundiError(f"{model.run.path} was trained without a validation part (--val-fraction 0), so no "
                         f"held-out images are left to calibrate abstaining on: retrain with --val-fraction "
                         f"0.1, or serve with --abstain-threshold none (or a nearest-oracle distance)")
    source = f"{meta['dataset']} train split, validation part held out by training ({len(va)} images)"
    if limit is not None and len(va) > limit:
        va = np.sort(np.random.default_rng(0).choice(va, limit, replace=False))
    return images[va], labels[va], source


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


def calibrate_rule(model: LoadedModel, images: np.ndarray, labels: np.ndarray | None = None,
                   rate: float = 0.01, fields: tuple[str, ...] = tuple(SIGNALS)) -> dict:
    """Thresholds of the signals ``fields`` (default: all SIGNALS; others off), set together so
    that their union abstains on as many of ``images`` as possible but at most ``rate``, with
    the figures behind them."""
    if not 0.0 < rate < 1.0:
        raise DundiError(f"the false-abstain rate must be in (0, 1), got {rate}")
    if len(images) == 0:
        raise DundiError("no held-out images to calibrate the abstain rule on")
    emb = model.run.embed(images, model.embed_batch)
    r = model.run.oracle.classify(emb, n=model.n, m=model.config.m, k=model.config.k)
    values = {f: v for f, v in signal_values(images, emb, r.nearest_distance).items() if f in fields}
    depth = _deepen(values, rate)
    best = {f: _threshold(values[f], f, j) for f, j in depth.items()}
    flags = abstain_flags(values, best)
    out = {"thresholds": {**OFF, **best}, "rate": rate, "count": int(len(images)), "depth": depth,
           "abstain_rate": float(flags.mean()), "n": model.n, "m": model.config.m, "k": model.config.k,
           "per_signal_rate": {f: float(abstain_flags(values, {f: t}).mean()) for f, t in best.items()}}
    if labels is not None:
        correct = r.labels == labels
        out["accuracy"] = float(correct.mean())
        out["accuracy_when_answering"] = float(correct[~flags].mean()) if (~flags).any() else float("nan")
    return out


def save_calibration(model: LoadedModel, calibration: dict, source: str) -> None:
    """Store the rule calibrated on ``model`` with the live index's metadata in run.json,
    under the run's write lock. Every index change (build, add, remove) replaces that
    metadata, and the rule names the index file it was measured on, so a threshold never
    outlives the oracles it was measured against."""
    from dundi.artifacts import atomic_write_json, index_sha256, read_meta, run_lock

    run_dir = model.run.path
    with run_lock(run_dir):
        meta = read_meta(run_dir)
        if index_sha256(meta) != model.info.index_sha256:
            raise DundiError(f"the oracle index of {run_dir} changed while calibrating (or a pinned "
                             f"version was calibrated): calibrate the live index again")
        record = {**calibration, "source": source, "index_sha256": model.info.index_sha256}
        meta["oracle"] = {**meta["oracle"], "abstain": record}
        atomic_write_json(run_dir / "run.json", meta)


def stored_calibration(meta: dict, n: int, m: int, k: int, index_sha: str) -> dict | None:
    """The rule stored for the index file ``index_sha`` at these n, m, k (distances depend on
    all four), or None."""
    cal = (meta.get("oracle") or {}).get("abstain")
    if cal and (cal.get("n"), cal.get("m"), cal.get("k"), cal.get("index_sha256")) == (n, m, k, index_sha):
        return cal
    return None


DEFAULT_RATE = 0.01  # the false-abstain rate served by default: 1 % of clean held-out images
OFF = {field: None for field in SIGNALS}


def abstain_settings(model: LoadedModel, choice: float | str | None, rate: float | None = None,
                     data_dir: str | None = None, limit: int | None = 2000) -> tuple[dict, str]:
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
    cfg = model.config
    stored = (stored_calibration(model.run.meta, model.n, cfg.m, cfg.k, model.info.index_sha256)
              if rate is None else None)
    if stored:
        return dict(stored["thresholds"]), (f"abstain rule calibrated by `dundi index calibrate`: "
                                            f"{stored['abstain_rate']:.2%} false abstains on {stored['source']}")
    images, labels, source = held_out_images(model, data_dir, limit)
    cal = calibrate_rule(model, images, labels, DEFAULT_RATE if rate is None else rate)
    return dict(cal["thresholds"]), (f"abstain rule calibrated now: {cal['abstain_rate']:.2%} false "
                                     f"abstains on {source} (store it with `dundi index calibrate "
                                     f"{model.run.path}`)")
