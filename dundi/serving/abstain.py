"""Calibrating the abstain threshold on held-out data.

An input far from every oracle is one the oracle database says nothing about (another
dataset, noise, a heavily perturbed image): the service can answer "unknown" instead of the
nearest class. The threshold is the ``quantile`` of the nearest-oracle distance over
held-out, in-distribution images, so about ``1 − quantile`` of clean inputs abstain.

Held-out data: the validation part of the run's training split (the same seeded split the
training used, so the model never trained on it), minus any image that is itself an oracle.
A run trained without a validation part falls back to the test split, and says so.
"""

from __future__ import annotations

import numpy as np

from dundi.errors import DundiError
from dundi.serving.model import LoadedModel


def held_out_images(model: LoadedModel, data_dir: str | None = None, limit: int | None = 2000
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, description) of in-distribution images the model did not train on."""
    from dundi.data import load_split
    from dundi.train import split_train_val

    meta = model.run.meta
    cfg = meta.get("config", {})
    images, labels, ids = load_split(meta["dataset"], "train", data_dir, limit=cfg.get("limit"))
    _, va = split_train_val(labels, cfg.get("val_fraction", 0.0), cfg.get("seed", 0))
    oracle_ids = set(model.run.oracle.meta.get("ids", [])) if model.run.oracle else set()
    va = np.array([i for i in va if int(ids[i]) not in oracle_ids], dtype=np.int64)
    if len(va):
        source = f"{meta['dataset']} train split, validation part held out by training ({len(va)} images)"
    else:
        images, labels, _ = load_split(meta["dataset"], "test", data_dir)
        va = np.arange(len(labels))
        source = (f"{meta['dataset']} test split (the run holds no validation part out of training; "
                  f"do not report test accuracy with this threshold as untouched)")
    if limit is not None and len(va) > limit:
        va = np.sort(np.random.default_rng(0).choice(va, limit, replace=False))
    return images[va], labels[va], source


def calibrate(model: LoadedModel, images: np.ndarray, labels: np.ndarray | None = None,
              quantile: float = 0.99) -> dict:
    """Threshold = ``quantile`` of the nearest-oracle distances of ``images`` under the
    model's n, m, k (without abstaining). Returns the threshold with the figures behind it."""
    if not 0.0 < quantile <= 1.0:
        raise DundiError(f"the abstain quantile must be in (0, 1], got {quantile}")
    if len(images) == 0:
        raise DundiError("no held-out images to calibrate the abstain threshold on")
    r = model.run.classify(images, n=model.n, m=model.config.m, k=model.config.k)
    dist = r.nearest_distance
    threshold = float(np.quantile(dist, quantile))
    kept = dist <= threshold
    out = {"abstain_threshold": threshold, "quantile": quantile, "count": int(len(dist)),
           "abstain_rate": float(1.0 - kept.mean()),
           "distance_median": float(np.median(dist)), "distance_max": float(dist.max())}
    if labels is not None:
        correct = r.labels == labels
        out["accuracy"] = float(correct.mean())
        out["accuracy_when_answering"] = float(correct[kept].mean()) if kept.any() else float("nan")
    return out


# --- the abstain rule served by default: three signals calibrated together -----------------
#
# Measured on the runs in docs/results/abstain: the nearest-oracle distance alone flags few
# inverted digits and almost no uniform noise (noise embeds near the middle of the oracle
# cloud, closer to some oracle than many real digits are). Two further signals cover it:
# the embedding's norm (noise and inverted digits excite the trained filters weakly and land
# near the origin) and an input statistic, the share of mid-grey pixels (neither near black
# nor near white: the digits datasets are nearly binary, noise and photographs are not).
# Each is thresholded at a common tail level chosen so that the union abstains on the stated
# share of held-out clean images.

GREY_BAND = (0.1, 0.9)
# field of ModelConfig -> (what it measures, +1: abstain above the threshold / -1: below)
SIGNALS = {"abstain_threshold": ("nearest-oracle distance", 1),
           "abstain_min_norm": ("embedding norm", -1),
           "abstain_max_grey": ("share of mid-grey pixels", 1)}


def grey_share(images: np.ndarray) -> np.ndarray:
    """(B,) share of each image's pixels strictly inside GREY_BAND."""
    lo, hi = GREY_BAND
    flat = images.reshape(len(images), -1)
    return ((flat > lo) & (flat < hi)).mean(axis=1).astype(np.float64)


def signal_values(images: np.ndarray, embeddings: np.ndarray, nearest_distance: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Every abstain signal of a batch, keyed by the ModelConfig field that thresholds it."""
    return {"abstain_threshold": np.asarray(nearest_distance, np.float64),
            "abstain_min_norm": np.linalg.norm(embeddings.astype(np.float64), axis=1),
            "abstain_max_grey": grey_share(images)}


def abstain_flags(values: dict[str, np.ndarray], thresholds: dict[str, float | None]) -> np.ndarray:
    """(B,) True where any signal with a threshold lies beyond it (None: signal off)."""
    size = len(next(iter(values.values())))
    flags = np.zeros(size, bool)
    for field, thr in thresholds.items():
        if thr is None:
            continue
        v = values[field]
        flags |= (v > thr) if SIGNALS[field][1] > 0 else (v < thr)
    return flags


def _thresholds_at(values: dict[str, np.ndarray], j: int) -> dict[str, float]:
    """Per signal, the threshold beyond which at most ``j`` calibration values lie (the
    (j+1)-th most extreme value: strictly beyond it abstains)."""
    out = {}
    for field, v in values.items():
        ordered = np.sort(v)[::-1] if SIGNALS[field][1] > 0 else np.sort(v)
        out[field] = float(ordered[min(j, len(ordered) - 1)])
    return out


def calibrate_rule(model: LoadedModel, images: np.ndarray, labels: np.ndarray | None = None,
                   rate: float = 0.01, fields: tuple[str, ...] = tuple(SIGNALS)) -> dict:
    """Thresholds of the signals ``fields`` (default: all SIGNALS; others off) at one common
    tail depth ``j`` — the largest for which their union abstains on at most ``rate`` of
    ``images`` — with the figures behind them."""
    if not 0.0 < rate < 1.0:
        raise DundiError(f"the false-abstain rate must be in (0, 1), got {rate}")
    if len(images) == 0:
        raise DundiError("no held-out images to calibrate the abstain rule on")
    emb = model.run.embed(images, model.embed_batch)
    r = model.run.oracle.classify(emb, n=model.n, m=model.config.m, k=model.config.k)
    values = {f: v for f, v in signal_values(images, emb, r.nearest_distance).items() if f in fields}
    best_j, best = 0, _thresholds_at(values, 0)
    for j in range(1, int(np.ceil(rate * len(images))) + 1):
        th = _thresholds_at(values, j)
        if abstain_flags(values, th).mean() > rate:
            break
        best_j, best = j, th
    flags = abstain_flags(values, best)
    out = {"thresholds": {**OFF, **best}, "rate": rate, "count": int(len(images)), "tail_depth": best_j,
           "abstain_rate": float(flags.mean()), "n": model.n, "m": model.config.m, "k": model.config.k,
           "per_signal_rate": {f: float(abstain_flags(values, {f: t}).mean()) for f, t in best.items()}}
    if labels is not None:
        correct = r.labels == labels
        out["accuracy"] = float(correct.mean())
        out["accuracy_when_answering"] = float(correct[~flags].mean()) if (~flags).any() else float("nan")
    return out


def save_calibration(run_dir: str, calibration: dict, source: str) -> None:
    """Store the calibrated rule with the index metadata in run.json; rebuilding the index
    replaces that metadata, so a threshold never outlives the oracles it was measured on."""
    from dundi.artifacts import read_meta, update_meta

    meta = read_meta(run_dir)
    if "oracle" not in meta:
        raise DundiError(f"{run_dir} has no oracle index yet: run `dundi index build {run_dir}`")
    oracle = {**meta["oracle"], "abstain": {**calibration, "source": source}}
    update_meta(run_dir, oracle=oracle)


def stored_calibration(meta: dict, n: int, m: int, k: int) -> dict | None:
    """The calibration stored for this index at these n, m, k (distances depend on them), or None."""
    cal = meta.get("oracle", {}).get("abstain")
    if cal and (cal.get("n"), cal.get("m"), cal.get("k")) == (n, m, k):
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
    stored = stored_calibration(model.run.meta, model.n, cfg.m, cfg.k) if rate is None else None
    if stored:
        return dict(stored["thresholds"]), (f"abstain rule calibrated by `dundi index calibrate`: "
                                            f"{stored['abstain_rate']:.2%} false abstains on {stored['source']}")
    images, labels, source = held_out_images(model, data_dir, limit)
    cal = calibrate_rule(model, images, labels, DEFAULT_RATE if rate is None else rate)
    return dict(cal["thresholds"]), (f"abstain rule calibrated now: {cal['abstain_rate']:.2%} false "
                                     f"abstains on {source} (store it with `dundi index calibrate "
                                     f"{model.run.path}`)")
