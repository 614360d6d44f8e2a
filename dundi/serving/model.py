"""The served model without any server: a verified run, its oracle index and the settings
(n, m, k, abstain threshold) under which requests are answered.

:class:`LoadedModel` is what a Serve classifier replica and the plain-uvicorn reference both
hold; swapping one for another is how the index and n, m, k change at runtime. Loading goes
through :func:`dundi.run.directory.Run.load`, which re-hashes every file against the sha256
recorded in ``run.json`` and refuses a file that changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dundi.errors import DundiError
from dundi.nets.arithmetic import check_arithmetic
from dundi.nets.inference import EMBED_BATCH
from dundi.rule.abstain_signals import ABSTAIN_SIGNALS, CERTIFIED_SIGNALS, abstain_flags, signal_values
from dundi.rule.params import DEFAULT_METRIC, KEPT_CLASSES, TwoStepRule
from dundi.rule.shape_signal import SHAPE_FILE
from dundi.run.directory import Run
from dundi.run.storage import index_sha256, index_version, load_shape_basis
from dundi.serving.errors import RequestError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which run to serve and how: the Serve classifier's ``user_config``.

    ``n``, ``m`` and ``k`` are the rule (:attr:`rule`; n None: every oracle in the index, m
    None: min(3, n)). ``abstain_threshold`` None never abstains;
    otherwise an input whose nearest oracle (among the k classes kept by step 1) is farther
    than the threshold gets the answer "unknown" (see :mod:`dundi.serving.abstain`).
    ``abstain_min_norm``, ``abstain_max_grey`` and ``abstain_max_mean`` (None: off) also
    answer "unknown" for an embedding shorter than the first, or an image with a larger share
    of mid-grey pixels or a larger mean pixel value than the others: the signals `dundi index
    calibrate` sets together with the distance threshold (ABSTAIN_SIGNALS).
    """

    run: str
    n: int | None = None
    m: int | None = None
    k: int = KEPT_CLASSES
    abstain_threshold: float | None = None
    abstain_min_norm: float | None = None
    abstain_max_grey: float | None = None
    abstain_max_mean: float | None = None
    abstain_min_margin: float | None = None       # the selective signals (dundi.serving.abstain)
    abstain_min_agree: float | None = None
    abstain_min_range: float | None = None
    abstain_max_background: float | None = None   # served outside the certified radius
    abstain_max_shape: float | None = None        # served outside the certified radius
    index_version: int | None = None
    certify_eps: float | None = None
    certificates: bool = True   # false: a certified run answers without certificates (cheaper)

    FIELDS = ("run", "n", "m", "k", *ABSTAIN_SIGNALS, "index_version", "certify_eps", "certificates")

    @property
    def rule(self) -> TwoStepRule:
        """The request this config's JSON fields make (n, m, k are the edge's form of it):
        :class:`LoadedModel` has the index resolve it, once."""
        return TwoStepRule(self.n, self.m, self.k)

    @classmethod
    def of(cls, run: str, rule: TwoStepRule, **settings) -> "ModelConfig":
        """The config serving ``rule`` (a request) for ``run``, checked as a JSON one is."""
        return cls.from_dict({"run": run, **rule.as_dict(), **settings})

    @classmethod
    def from_dict(cls, data: Any, base: "ModelConfig | None" = None) -> "ModelConfig":
        """Validate a JSON object (a reload request, a Serve user_config). Fields left out
        keep their value in ``base``. Raises RequestError 422 saying what is wrong."""
        expected = ('a JSON object with any of "run" (run directory), "n", "m", "k" '
                    '(positive integers; n may be null for all oracles, m for min(3, n)), "abstain_threshold" '
                    '(positive number or null), "abstain_min_norm", "abstain_max_grey", '
                    '"abstain_max_mean", "abstain_min_margin", "abstain_min_agree", "abstain_min_range", '
                    '"abstain_max_background", "abstain_max_shape" '
                    '(non-negative numbers or null), '
                    '"index_version" (an index '
                    'version of the run, null for the live one), "certify_eps" (an L∞ radius in '
                    '(0, 1] to certify each answer at, null for the full radius), "certificates" '
                    '(true, or false to answer a certified run without certificates)')
        if not isinstance(data, dict):
            raise RequestError(422, "invalid_config", f"the model settings are a {type(data).__name__}", expected)
        unknown = sorted(set(data) - set(cls.FIELDS))
        if unknown:
            raise RequestError(422, "invalid_config", f"unknown setting(s) {', '.join(unknown)}", expected)
        merged = {**(dataclasses.asdict(base) if base else {}), **data}
        if base is not None and data.get("run", base.run) != base.run and "index_version" not in data:
            merged["index_version"] = None  # a pinned version belongs to the old run
        if not isinstance(merged.get("run"), str) or not merged["run"]:
            raise RequestError(422, "invalid_config", "no run directory given", expected)
        for name in ("n", "m", "k", "index_version"):
            value = merged.get(name, getattr(cls, name))
            if not (value is None and name in ("n", "m", "index_version")) and (isinstance(value, bool) or not isinstance(value, int)):
                raise RequestError(422, "invalid_config", f"{name}={value!r} is not an integer", expected)
        ceps = merged.get("certify_eps")
        if ceps is not None:
            if isinstance(ceps, bool) or not isinstance(ceps, (int, float)) or not 0 < ceps <= 1:
                raise RequestError(422, "invalid_config", f"certify_eps={ceps!r} is not a radius in (0, 1]", expected)
            merged["certify_eps"] = float(ceps)
        if not isinstance(merged.get("certificates", True), bool):
            raise RequestError(422, "invalid_config", f"certificates={merged['certificates']!r} is not true or false",
                               expected)
        if merged.get("certificates") is False and merged.get("certify_eps") is not None:
            raise RequestError(422, "invalid_config", "certify_eps asks for certificates that certificates=false "
                               "turns off", expected)
        thr = merged.get("abstain_threshold")
        if thr is not None:
            if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr) or thr <= 0:
                raise RequestError(422, "invalid_config", f"abstain_threshold={thr!r} is not a positive number", expected)
            merged["abstain_threshold"] = float(thr)
        for name in list(ABSTAIN_SIGNALS)[1:]:
            value = merged.get(name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value < 0:
                    raise RequestError(422, "invalid_config", f"{name}={value!r} is not a non-negative number",
                                       expected)
                merged[name] = float(value)
        try:
            TwoStepRule(merged.get("n"), merged.get("m"), merged.get("k", cls.k))
        except DundiError as exc:
            raise RequestError(422, "invalid_config", str(exc), expected) from None
        return cls(**merged)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What clients and the HTTP layer need to know about the model being served."""

    version: str                  # changes whenever weights, index, n, m, k or threshold change
    run: str                      # the run directory's name only: clients never see server paths
    weights_sha256: str           # with index_sha256, names exactly which run answers
    index_sha256: str
    dataset: str
    arch: str
    in_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    n: int                        # the rule answering, resolved (dundi.rule.params.TwoStepRule)
    m: int
    k: int
    oracles_per_class: int
    embed_dim: int
    abstain_threshold: float | None
    metric: str = DEFAULT_METRIC  # the distance the rule ranks by (its name: the HTTP edge)
    certified: bool = False       # answers carry a certified L∞ radius (sqeuclidean runs)
    abstain_min_norm: float | None = None  # the other abstain signals (dundi.serving.abstain)
    abstain_max_grey: float | None = None
    abstain_max_mean: float | None = None
    index_version: int | None = None       # the oracle index version answering (dundi index list)
    step1: str = ""               # how step 1 is answered: exact (float64), exact (FAISS), shortlist
    certify_eps: float | None = None  # certified_radius is this eps or 0 (None: the full radius)
    abstain_min_margin: float | None = None       # the selective signals (dundi.serving.abstain)
    abstain_min_agree: float | None = None
    abstain_min_range: float | None = None
    abstain_max_background: float | None = None
    abstain_max_shape: float | None = None
    # signals with a threshold that the certified radius does not cover: an answer within the
    # radius keeps its label, but these may still withhold it (CERTIFIED_SIGNALS)
    uncertified_signals: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["in_shape"] = list(self.in_shape)
        d["class_names"] = list(self.class_names)
        d["uncertified_signals"] = list(self.uncertified_signals)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        return cls(**{**d, "in_shape": tuple(d["in_shape"]), "class_names": tuple(d["class_names"]),
                      "uncertified_signals": tuple(d.get("uncertified_signals", ()))})


@dataclasses.dataclass
class Prediction:
    """Per image: the label (the two-step answer), whether it abstained, the k classes kept by
    step 1 (best first) with their coarse scores, their fine scores (same order) and the
    distance to the nearest oracle among those k classes' n oracles. Scores are summed
    similarities (negative distances, as the run's metric says): higher is better.

    ``certified_radius`` (runs ranking by squared Euclidean distance only, else None): the
    largest L∞ radius within which this service provably gives the same answer -- the same
    label, computed as served, and never "unknown" (the abstain thresholds are inside the
    proof; :meth:`dundi.robustness.certificate.Certifier.radius`; 0 = not certified); NaN where the
    service abstained. With ``ModelConfig.certify_eps`` set, it is that eps where the answer is
    certified there and 0 elsewhere: a radius the answer provably holds within (a lower bound
    of the largest), at the cost of one interval pass instead of a bisection."""

    labels: np.ndarray            # (B,) int64
    abstained: np.ndarray         # (B,) bool
    kept_classes: np.ndarray      # (B, k) int64, -1 where the coarse step found fewer classes
    coarse_scores: np.ndarray     # (B, k) float64
    fine_scores: np.ndarray       # (B, k) float64
    nearest_distance: np.ndarray  # (B,) float64
    certified_radius: np.ndarray | None = None  # (B,) float64, or None for uncertifiable runs

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, sizes: list[int]) -> list["Prediction"]:
        """Consecutive parts of ``sizes`` images each (one batch back to its requests)."""
        bounds = np.cumsum([0, *sizes])
        fields = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return [Prediction(*(None if f is None else f[a:b] for f in fields))
                for a, b in zip(bounds[:-1], bounds[1:])]


class LoadedModel:
    """A verified DunDi run with its oracle index, answering batches of images."""

    def __init__(self, config: ModelConfig, embed_batch: int = EMBED_BATCH, run: Run | None = None):
        """``run``: that run already loaded and verified (its directory and index version are
        ``config``'s), so a change of the abstain settings does not load it again."""
        run_dir = Path(config.run)
        if not run_dir.is_dir():
            raise DundiError(f"run directory {config.run} does not exist (on the host serving it)")
        if run is None:
            run = Run.load(run_dir, index_version=config.index_version)  # verifies weights and index
        if run.oracle is None:
            raise DundiError(f"{config.run} is a {run.meta['kind']} run: serving needs a DunDi run "
                             f"with an oracle index (`dundi train`, then `dundi index build`)")
        # the one place serving resolves the rule: predict, the certifier and the abstain rule
        # take this value as it is
        self.rule = rule = run.oracle.resolve(config.rule)
        self.run = run
        self.config = config
        self.embed_batch = embed_batch
        meta = run.meta
        self.shape = load_shape_basis(run.path, meta)  # the shape signal's reference, if fitted
        if config.abstain_max_shape is not None and self.shape is None:
            raise DundiError(f"abstain_max_shape is set but {config.run} has no shape basis: calibrate the run "
                             f"(`dundi index calibrate {config.run}`), which fits it, or leave the setting out")
        files = meta.get("files", {})
        index_hash = index_sha256(meta, config.index_version)
        fingerprint = json.dumps([files.get("model.safetensors"), index_hash, files.get(SHAPE_FILE),
                                  rule.n, rule.m, rule.k, *(getattr(config, f) for f in ABSTAIN_SIGNALS),
                                  config.certify_eps, config.certificates])
        self.info = ModelInfo(
            version=hashlib.sha256(fingerprint.encode()).hexdigest()[:12],
            run=run_dir.resolve().name, weights_sha256=files.get("model.safetensors", ""),
            index_sha256=index_hash, dataset=meta["dataset"], arch=meta["arch"],
            in_shape=tuple(int(s) for s in meta["in_shape"]), num_classes=len(run.class_names),
            class_names=run.class_names, index_version=index_version(meta) if config.index_version
            is None else config.index_version,
            **rule.as_dict(), oracles_per_class=run.oracle.n, embed_dim=run.oracle.dim,
            # certificates need n oracles in every class: not after a few-image enrollment
            certified=run.oracle.answers_exactly(rule) and config.certificates,
            step1=run.oracle.step1_kind(rule), certify_eps=config.certify_eps,
            uncertified_signals=tuple(f for f in ABSTAIN_SIGNALS if f not in CERTIFIED_SIGNALS
                                      and getattr(config, f) is not None),
            **{f: getattr(config, f) for f in ABSTAIN_SIGNALS})
        # Built with the model, so a new run or rule (a new LoadedModel) gets its own; a
        # certified run refuses an arithmetic its proof does not cover, before any answer.
        if not self.info.certified:
            check_arithmetic(certified=False, device=run.device)  # warns, naming the setting
        self.certifier = run.certifier(rule) if self.info.certified else None

    def predict(self, images: np.ndarray) -> Prediction:
        """Algorithm 1 on (B, C, H, W) float32 images in [0, 1] (validated by the caller)."""
        check_shape(images, self.info.in_shape)
        if len(images) == 0:
            r = self.run.classify(images, self.rule)
            emb = np.zeros((0, self.run.oracle.dim), np.float32)
        else:
            emb = self.run.embed(images, self.embed_batch)
            r = self.run.oracle.classify(emb, self.rule)
        values = signal_values(images, emb, r.nearest_distance, r, self.run.oracle, self.rule.n, self.shape)
        abstained = abstain_flags(values, {f: getattr(self.config, f) for f in ABSTAIN_SIGNALS})
        labels = r.labels.astype(np.int64)
        radius = None
        if self.certifier is not None:
            radius = self.certified_radius(images, labels)
            radius[abstained] = np.nan
        return Prediction(labels, abstained, r.topk_classes.astype(np.int64),
                          r.coarse_scores, r.fine_scores, r.nearest_distance, radius)

    def certified_radius(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(B,) float64: for each image, the L∞ radius within which this service provably
        answers ``labels`` and never abstains (the Certifier of the run for this rule, with
        this config's abstain thresholds as its gate)."""
        import torch

        from dundi.robustness.certificate import AbstainGate

        gate = AbstainGate(**{f: getattr(self.config, f) for f in CERTIFIED_SIGNALS})
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        eps = self.config.certify_eps
        with torch.no_grad():
            if eps is not None:  # one interval pass: eps where certified there, else 0
                ok = self.certifier.certified_at(x, y, eps, gate=gate).numpy()
                return np.where(ok, eps, 0.0)
            return self.certifier.radius(x, y, gate=gate).numpy().astype(np.float64, copy=True)


def check_shape(images: np.ndarray, in_shape: tuple[int, ...]) -> None:
    """Refuse a batch that is not (N, C, H, W) for this model (422, saying the shape)."""
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(in_shape):
        raise RequestError(422, "bad_shape", f"the model received images of shape {list(images.shape)}",
                           f"(N, {', '.join(map(str, in_shape))}) float32 images; the model being "
                           f"served may have changed, check GET /v2/models/<name>")
