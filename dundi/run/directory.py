"""The Run facade: a loaded, verified run -- its model, metadata and oracle index -- and what
the Python API does with one (classify, embed, certify, export). The files, index versions and
write lock underneath are :mod:`dundi.run.storage`'s.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from dundi.data.pixels import validate_images
from dundi.errors import DundiError
from dundi.nets.inference import EMBED_BATCH
from dundi.robustness.verifiers import DEFAULT_VERIFIER
from dundi.rule.index import OracleIndex
from dundi.rule.params import ResolvedRule, TwoStepResult, TwoStepRule
from dundi.run.storage import (
    WEIGHTS_FILE,
    commit_version,
    dataset_class_names,
    index_sha256,
    load_model,
    load_oracle,
    run_lock,
)


def change_oracle(run_dir: str | os.PathLike, change: Callable[["Run"], dict]) -> dict:
    """Read-modify-write of the live index under the run's lock: ``change`` gets the loaded,
    verified run, changes ``run.oracle`` in place (or raises DundiError: nothing is written)
    and returns run.json fields to merge; the index is written as the next version."""
    with run_lock(run_dir):
        run = Run.load(run_dir)
        fields = change(run)
        return commit_version(Path(run_dir), run.oracle, **fields)


@dataclasses.dataclass
class Run:
    """A loaded run: model, metadata and (for DunDi runs) the oracle index."""

    path: Path
    model: nn.Module
    meta: dict
    oracle: OracleIndex | None = None

    @classmethod
    def load(cls, run_dir: str | os.PathLike, with_oracle: bool = True,
             index_version: int | None = None) -> "Run":
        """Load and verify a run; ``index_version`` pins an oracle index version (default:
        the live one), so a service can name exactly which oracle set answers."""
        model, meta = load_model(run_dir)
        oracle = (load_oracle(run_dir, meta, index_version)
                  if with_oracle and meta["kind"] == "dundi" else None)
        return cls(Path(run_dir), model, meta, oracle)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The name of every class the run answers with, by label: the oracle index's names
        (enrolled classes included) for DunDi runs, the dataset's for native runs."""
        if self.oracle is not None:
            return tuple(self.oracle.class_names)
        return dataset_class_names(self.meta)

    @property
    def device(self) -> str:
        """The device type the model computes on ("cpu", "cuda")."""
        return next((p.device.type for p in self.model.parameters()), "cpu")

    def embed(self, images: np.ndarray, batch_size: int = EMBED_BATCH) -> np.ndarray:
        """Embeddings (B, D) float32. A run ranking by squared Euclidean distance (certifiable)
        embeds through :func:`dundi.rule.exact.embed_invariant`, so an image's embedding -- and
        so its answer and certificate -- is the same bits in any batch."""
        if self.oracle is not None and self.oracle.distance.certifiable:
            from dundi.nets.bounds import layers_of
            from dundi.rule.exact import embed_invariant

            self.model.eval()
            return embed_invariant(layers_of(self.model), images, min(batch_size, 256))
        from dundi.nets.inference import forward_batched

        return forward_batched(self.model, images, batch_size)

    def classify(self, images: np.ndarray | torch.Tensor, rule: TwoStepRule | ResolvedRule | None = None,
                 batch_size: int = EMBED_BATCH) -> TwoStepResult:
        """Classify raw images: Algorithm 1 for DunDi runs, the argmax of the logits for native runs.

        ``images`` are float pixels in [0, 1] (or uint8 pixels 0..255, converted to ``k / 255``
        as the dataset cache does), shaped like the run's ``in_shape`` (C, H, W) with or without
        the batch axis; single-channel runs also take (N, H, W) and (H, W). Anything else is
        refused with one :class:`DundiError` saying what is expected — the same contract as the
        HTTP server, because a 0..255 image classified as if it were [0, 1] gets a confident,
        wrong answer instead of an error. The result always has a batch axis (B = 1 for one
        image).

        DunDi runs answer under ``rule`` (:class:`dundi.rule.params.TwoStepRule`; by default n
        is every oracle in the index, m min(3, n) -- the paper's setting -- and k = 5). Native
        runs have no oracles, so a rule's n and m are refused; their result holds the top
        ``rule.k`` classes by logit with the logits as both coarse and fine scores, and NaN as
        the nearest-oracle distance.
        """
        if batch_size < 1:
            raise DundiError(f"batch_size={batch_size} must be at least 1")
        batch = validate_images(images, tuple(self.meta["in_shape"]))
        rule = rule or TwoStepRule()
        if self.meta["kind"] == "native":
            return self._classify_native(batch, rule, batch_size)
        if self.oracle is None:
            raise DundiError(f"{self.path} was loaded without its oracle index: load it with "
                             f"Run.load(path) (with_oracle=True), after `dundi index build {self.path}`")
        rule = self.oracle.resolve(rule)  # asked once; the index's answers take it as it is
        if len(batch) == 0:  # the model would give (0, 0) embeddings; the index answers empty
            return self.oracle.classify(np.zeros((0, self.oracle.dim), np.float32), rule)
        return self.oracle.classify(self.embed(batch, batch_size), rule)

    def _classify_native(self, batch: np.ndarray, rule: TwoStepRule, batch_size: int) -> TwoStepResult:
        """The native model's answer in the shape of a two-step result, so code written for
        DunDi runs (labels, top-k with scores) reads a native run's answers unchanged."""
        if isinstance(rule, ResolvedRule) or rule.n is not None or rule.m is not None:
            raise DundiError(f"{self.path} is a native run: it has no oracles, so n, m and the metric "
                             f"do not apply; omit them (it classifies by the argmax of its logits)")
        classes, k = int(self.meta["num_classes"]), rule.k
        if not 1 <= k <= classes:
            raise DundiError(f"k={k} must be between 1 and the number of classes ({classes})")
        if len(batch) == 0:
            logits = np.zeros((0, classes), np.float32)
        else:
            from dundi.nets.inference import forward_batched

            logits = forward_batched(self.model, batch, batch_size)
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int64)  # ties: lower class
        scores = np.take_along_axis(logits, top, 1).astype(np.float64)
        return TwoStepResult(top[:, 0].copy(), top, scores, scores.copy(),
                             np.full(len(batch), np.nan))

    def file_hashes(self) -> dict[str, str]:
        """sha256 of the weights and of the live index's file: what names this run's answers."""
        return {"weights_sha256": self.meta.get("files", {}).get(WEIGHTS_FILE, ""),
                "index_sha256": index_sha256(self.meta)}

    def as_module(self, rule: TwoStepRule | None = None) -> nn.Module:
        """This DunDi run as a plain ``torch.nn.Module``, images (N, C, H, W) → (N, classes)
        scores whose argmax is Algorithm 1's label under ``rule`` for every input, ties
        included, differentiable like the adaptive stand-in: for outside attack tools
        (:mod:`dundi.run.export`; ``dundi export`` writes it as TorchScript)."""
        from dundi.run.export import build_module

        return build_module(self, rule)

    def certifier(self, rule: TwoStepRule | ResolvedRule | None = None, verifier: str = DEFAULT_VERIFIER):
        """A :class:`dundi.robustness.certificate.Certifier` for this run's ``rule``. Only runs
        whose rule uses the squared Euclidean distance can be certified (train with --certified).
        A native run gets a :class:`dundi.robustness.native_certificate.SoftmaxCertifier` for
        the argmax of its logits (``rule`` may only give k, which does not change the answer).
        Refuses, naming the setting, where the process's float32 arithmetic is not the one the
        certificate assumes (:func:`dundi.nets.arithmetic.check_arithmetic`). ``verifier``
        (:mod:`dundi.robustness.verifiers`) picks the bounds that prove a DunDi run's answers."""
        from dundi.nets.arithmetic import check_arithmetic
        from dundi.robustness.certificate import Certifier

        if self.meta.get("kind") == "native":
            from dundi.robustness.native_certificate import SoftmaxCertifier

            if rule is not None and (isinstance(rule, ResolvedRule) or rule.n is not None or rule.m is not None):
                raise DundiError(f"{self.path} is a native run: it has no oracles, so n, m and the metric "
                                 f"do not apply; omit them (its answer is the argmax of its logits)")
            if verifier != "interval":
                raise DundiError(f"{self.path} is a native run: the {verifier} verifier bounds DunDi runs' "
                                 f"two-step rule; certify it with --verifier interval")
            check_arithmetic(certified=True, device=self.device)
            return SoftmaxCertifier(self.model)
        if self.oracle is None:
            raise DundiError(f"{self.path} has no oracle index: only DunDi runs can be certified")
        if not self.oracle.distance.certifiable:
            raise DundiError(f"{self.path} ranks by {self.oracle.metric} distance; certificates are "
                             f"for the squared-Euclidean rule: train with `dundi train --certified`")
        rule = self.oracle.resolve(rule)
        n, counts = rule.n, self.oracle.class_counts()
        if counts.min() < n:
            raise DundiError(f"{self.path}: certificates need every class to hold at least n={n} "
                             f"oracles; the index's classes hold {int(counts.min())} to "
                             f"{int(counts.max())} (use n <= {int(counts.min())})")
        check_arithmetic(certified=True, device=self.device)
        return Certifier(self.model, self.oracle, rule, verifier)

    def oracle_tensor(self, n: int | None = None) -> torch.Tensor:
        """Oracle embeddings (C, n, D) for the differentiable scorers: the index's own padded
        view (:meth:`dundi.rule.index.OracleIndex.padded`) -- each class's first min(n, count)
        oracles, then copies of its last. With ``oracle.class_counts()`` a scorer scores a class
        holding fewer than n by the rule's mean × n exactly (:class:`dundi.rule.reference.
        TwoStepScorer`'s ``counts``)."""
        if self.oracle is None:
            raise DundiError(f"{self.path} was loaded without an oracle index")
        return torch.from_numpy(self.oracle.padded(n)[0])
