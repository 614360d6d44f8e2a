"""Algorithm 1 under the squared Euclidean distance as a certified run answers it: one
arithmetic for the answer and for its proof (docs/certification.md §5).

Why not FAISS's float32 distances: ‖z‖² + ‖o‖² − 2 z·o summed in float32 carries a rounding
error that grows with ‖z‖² and with n, and BLAS blocks a batch differently from a single
query, so an image near a tie got another label in a batch of 8 than alone. Here

* the scores are decided in float64 from the embedding z, through the linear form the
  certificate reasons about: for t oracles o_c1..o_ct of class c,
  S_c(z) = t‖z‖² + u_c(z) with u_c(z) = ν_c − 2 z·σ_c, σ_c = Σ_j o_cj, ν_c = Σ_j ‖o_cj‖²;
  the t‖z‖² term is common to every class, so classes are ranked by u_c alone;
* every sum runs in one fixed pairwise order (:func:`fixed_sum`), element by element, so an
  image's scores are the same bits whatever else is in its batch;
* step 1 is exact over every class at any index size (no shortlist), so what is certified
  is what answers.

The embedding z itself comes from :func:`embed_invariant`, a float32 forward pass whose
result does not depend on the batch either. The rounding error of all of it has a rigorous
bound (:func:`gamma`), which the certificate subtracts from every margin it proves.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from dundi.errors import DundiError
from dundi.rule.params import ResolvedRule, TwoStepResult

U32 = 2.0 ** -24   # unit roundoff of float32 (round to nearest)
U64 = 2.0 ** -53   # and of float64
EXACT_CLASSES = 4096  # up to this many classes step 1 is scored in fixed order directly;
                      # beyond, a BLAS product with a rigorous error bound picks who to score
CHUNK_ELEMENTS = 1 << 22  # float64 elements per temporary (32 MiB)
INVARIANT_ROWS = 8  # rows per pass where a gradient must be the same bits in any batch: with one
                    # torch thread, batches of 1-8 rows gave each row's bits alone, 16+ did not
                    # (the convolution's backward changes path); dundi.nets.invariant


def gamma(count: int, unit: float) -> float:
    """Higham's γ_n = n·u / (1 − n·u): a sum of n products, or n rounded operations in any
    order, is off by at most γ_n times the sum of the absolute values of its terms."""
    nu = count * unit
    if nu >= 0.5:
        raise ValueError(f"{count} terms are too many for a rounding bound at unit {unit}")
    return nu / (1.0 - nu)


def fixed_sum(p: np.ndarray) -> np.ndarray:
    """Sum over the last axis in one fixed pairwise order (halves added element by element),
    so the result for a row never depends on the array's other rows or its size."""
    while p.shape[-1] > 1:
        if p.shape[-1] % 2:
            p = np.concatenate([p, np.zeros_like(p[..., :1])], axis=-1)
        p = p[..., 0::2] + p[..., 1::2]
    return p[..., 0]


ROW_BLOCK = 16  # every kernel call sees a multiple of this many rows (see pad_rows)


def pad_rows(x: torch.Tensor, block: int = ROW_BLOCK) -> torch.Tensor:
    """``x`` with copies of its first row appended up to a multiple of ``block`` rows.

    Why, measured on this CPU (torch 2.13, oneDNN, MKL; 1 and 2 threads): a convolution --
    and so a Linear layer run as a 1×1 convolution -- takes another kernel path for batches
    under 16 rows at one thread, giving a row other bits than in a batch of 16 or more (and
    other bits than at two threads); a float64 matrix product gives a row other bits when
    the batch is not a multiple of 4. With every call padded to a multiple of 16 rows, every
    row has the same bits in any batch of 1..256 at any position and at 1 and 2 threads
    (tests/test_batch_invariance.py re-checks it on the machine it runs on)."""
    rows = len(x)
    extra = -rows % block
    if rows == 0 or extra == 0:
        return x
    return torch.cat([x, x[:1].expand(extra, *x.shape[1:])])


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ + b whose every row is the same bits in any batch: BLAS's matrix product blocks a
    batch of 16 differently from a batch of 2 (other bits per row); a 1×1 convolution on a
    multiple of :data:`ROW_BLOCK` rows does not (:func:`pad_rows`)."""
    rows = len(x)
    out = nn.functional.conv2d(pad_rows(x)[:, :, None, None], weight[:, :, None, None], bias)[:, :, 0, 0]
    return out[:rows]


@torch.no_grad()
def embed_invariant(layers: list[nn.Module], images: np.ndarray | torch.Tensor,
                    batch_size: int = 256) -> np.ndarray:
    """float32 embeddings (B, D) of the flat layer list ``layers`` whose every row is the same
    bits whatever batch it is computed in, at one torch thread or two. Every chunk is padded
    to a multiple of :data:`ROW_BLOCK` rows (:func:`pad_rows`), which pins oneDNN's convolution kernel path;
    Linear layers run as 1×1 convolutions (:func:`invariant_linear`). Measured, not a theorem:
    tests/test_batch_invariance.py re-checks batch sizes 1..256 at every position at 1 and 2
    threads, and the certificate never relies on it (its bounds hold in any summation order)."""
    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)
    device = next((p.device for layer in layers for p in layer.parameters()), torch.device("cpu"))
    outs = []
    for start in range(0, len(x), batch_size):
        h = x[start:start + batch_size].to(device)
        rows = len(h)
        h = pad_rows(h)
        for layer in layers:
            h = invariant_linear(h, layer.weight, layer.bias) if type(layer) is nn.Linear else layer(h)
        outs.append(h[:rows].float().cpu())
    if not outs:
        return np.zeros((0, 0), np.float32)
    return torch.cat(outs).numpy()


@dataclasses.dataclass(frozen=True)
class ClassSums:
    """σ_c (C, D) and ν_c (C,) of each class's first ``count`` oracles, float64, summed in
    fixed order; ``abs_sigma`` = Σ_j |o_cj| bounds |σ_c| for the rounding allowance."""

    sigma: np.ndarray
    nu: np.ndarray
    count: int

    @classmethod
    def of(cls, oracles: np.ndarray, count: int) -> "ClassSums":
        o = np.asarray(oracles[:, :count], dtype=np.float64)          # (C, t, D), exact
        sigma = fixed_sum(np.moveaxis(o, 1, -1))                       # (C, D)
        nu = fixed_sum(fixed_sum(o * o))                               # (C,)
        return cls(np.ascontiguousarray(sigma), nu, count)

    def u(self, z: np.ndarray, classes: np.ndarray | None = None) -> np.ndarray:
        """u_c(z) = ν_c − 2 z·σ_c in fixed order: (B, C) for every class, or (B, K) for the
        classes ``classes`` (B, K) of each row."""
        z = np.asarray(z, dtype=np.float64)
        if classes is not None:
            return self.nu[classes] - 2.0 * fixed_sum(z[:, None, :] * self.sigma[classes])
        step = max(1, CHUNK_ELEMENTS // max(1, len(z) * z.shape[1]))
        parts = [self.nu[c:c + step] - 2.0 * fixed_sum(z[:, None, :] * self.sigma[None, c:c + step])
                 for c in range(0, len(self.nu), step)]
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(z), 0))

    def error_bound(self, z: np.ndarray) -> np.ndarray:
        """(B, C): |u computed by :meth:`u` or by any BLAS product − u exact| for every class,
        through ‖z‖·‖σ_c‖ ≥ Σ_d |z_d σ_cd| (Cauchy–Schwarz)."""
        dim = self.sigma.shape[1]
        zn = np.sqrt(fixed_sum(np.asarray(z, np.float64) ** 2)) * (1 + 4 * U64)
        sn = np.sqrt(fixed_sum(self.sigma ** 2)) * (1 + 4 * U64)
        return 2 * gamma(dim + 4, U64) * (2 * zn[:, None] * sn[None, :] + np.abs(self.nu)[None, :])


def stable_smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest values per row, smallest first, ties to the lower index."""
    return np.argsort(values, axis=1, kind="stable")[:, :k]


class ExactRule:
    """Algorithm 1 under a :class:`ResolvedRule` ranking by the squared Euclidean distance, over
    oracles (C, ≥n, D), decided in float64 in fixed order. Built by
    :meth:`dundi.rule.index.OracleIndex.exact_rule`, which hands the same object to the
    certificate. Answers what :meth:`dundi.rule.index.OracleIndex.classify` answers for
    such an index (it delegates here), with the same tie rules: step 1 keeps the k smallest
    coarse sums, ties to the lower class; step 2 the smallest fine sum, ties to the class
    kept earlier."""

    def __init__(self, oracles: np.ndarray, rule: ResolvedRule):
        if not rule.distance.certifiable or oracles.shape[1] < rule.n:
            raise DundiError(f"the exact rule needs the squared Euclidean distance and n={rule.n} oracles "
                             f"per class; got {rule.metric} and {oracles.shape[1]}")
        n, m = rule.n, rule.m
        self.oracles = np.ascontiguousarray(oracles[:, :n], dtype=np.float32)  # (C, n, D)
        self.coarse, self.fine = ClassSums.of(self.oracles, m), ClassSums.of(self.oracles, n)
        self.rule, self.n, self.m, self.k = rule, n, m, rule.k

    @property
    def num_classes(self) -> int:
        return len(self.oracles)

    def step1(self, z: np.ndarray) -> np.ndarray:
        """(B, k) classes kept by step 1, best first."""
        if self.num_classes <= EXACT_CLASSES:
            return stable_smallest(self.coarse.u(z), self.k)
        # A BLAS product ranks every class to within a rigorous bound of the fixed-order value;
        # only classes that bound cannot separate from the k-th are scored in fixed order.
        z64 = np.asarray(z, np.float64)
        approx = self.coarse.nu[None, :] - 2.0 * (z64 @ self.coarse.sigma.T)
        err = self.coarse.error_bound(z)
        kth = np.partition(approx, self.k - 1, axis=1)[:, self.k - 1]
        keep = approx - 2 * err <= (kth + 2 * err.max(1))[:, None]
        top = np.empty((len(z), self.k), np.int64)
        for b in range(len(z)):
            cand = np.flatnonzero(keep[b])          # ascending: ties stay with the lower class
            u = self.coarse.u(z64[b:b + 1], cand[None, :])[0]
            top[b] = cand[np.argsort(u, kind="stable")[:self.k]]
        return top

    ROWS = 256  # embeddings per step: bounds the (rows, k, n, D) float64 nearest-oracle buffer

    def classify(self, z: np.ndarray):
        """Algorithm 1 for embeddings (B, D); a :class:`dundi.rule.index.TwoStepResult` whose
        scores are the summed similarities −S_c = −(t‖z‖² + u_c) of the kept classes."""
        z = np.asarray(z, dtype=np.float32)
        if len(z) > self.ROWS:
            parts = [self.classify(z[i:i + self.ROWS]) for i in range(0, len(z), self.ROWS)]
            return TwoStepResult(*(np.concatenate([getattr(p, f.name) for p in parts])
                                   for f in dataclasses.fields(TwoStepResult)))
        top = self.step1(z).astype(np.int64)
        z64 = z.astype(np.float64)
        sq = fixed_sum(z64 * z64)[:, None]
        u_coarse, u_fine = self.coarse.u(z64, top), self.fine.u(z64, top)
        best = np.argmin(u_fine, axis=1)  # the first minimum: ties to the better step-1 rank
        labels = top[np.arange(len(z)), best]
        diff = z64[:, None, None, :] - self.oracles[top].astype(np.float64)   # (B, k, n, D)
        nearest = np.sqrt(fixed_sum(diff * diff).min(axis=(1, 2))) if len(z) else np.zeros(0)
        return TwoStepResult(labels.astype(np.int64), top, -(self.m * sq + u_coarse),
                             -(self.n * sq + u_fine), nearest)


__all__ = ["U32", "U64", "ROW_BLOCK", "gamma", "fixed_sum", "pad_rows", "invariant_linear", "embed_invariant", "ClassSums", "ExactRule"]
