"""A certificate for Algorithm 1 as deployed: no input in the L∞ ball changes its label.

Under the squared Euclidean distance (the run setting ``metric="sqeuclidean"``) a class's
summed distance to a fixed set of oracles o_1..o_t is

    S_c(z) = Σ_j ‖z − o_cj‖² = t‖z‖² − 2 z·σ_c + ν_c,   σ_c = Σ_j o_cj,  ν_c = Σ_j ‖o_cj‖²,

and since every class sums over the same count t (m in step 1, n in step 2), the difference
of two classes' sums is linear in the embedding z:

    S_c(z) − S_a(z) = −2 z·(σ_c − σ_a) + ν_c − ν_a.

The embedding is z = W h + b (the Distance NN's last Linear layer), so the difference is
linear in the penultimate activations h, and its exact minimum over the interval box of h
(from :mod:`dundi.bounds`) is a lower bound over every input in the ball. The derivation,
including ties, is in docs/certification.md. In short, the label y is certified when

1. step 1 keeps y: fewer than k other classes c can reach S^m_c ≤ S^m_y anywhere in the
   ball (a class that cannot is always ranked below y, whatever the tie rule);
2. step 2 picks y: every other class c that can still enter the top k (it is not beaten
   for certain by k classes in step 1) has S^n_c > S^n_y everywhere in the ball.

Each condition uses strict inequalities with a small relative tolerance, so a tie — broken
either way by the deployed rule, or by float32 rounding in FAISS — is never certified.

Everything here is float64 and depends only on the query's bounds and the fixed oracle
embeddings: adding or swapping oracles never invalidates the method, only the numbers.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from dundi.bounds import input_box, propagate, split_last_linear
from dundi.errors import DundiError

# strict margins: a bound must beat zero by this fraction of the scores' scale
RELATIVE_TOLERANCE = 1e-6
RADIUS_STEPS = 14   # bisection steps: radius resolution is eps_max / 2**14
# Up to this many classes step 2's possible rivals are narrowed with all C² coarse pairs;
# beyond it every other class counts as a possible rival (sound, more conservative).
PAIRWISE_CLASS_LIMIT = 64


@dataclasses.dataclass
class OracleSums:
    """σ_c (C, D) and ν_c (C,) of the first ``count`` oracles of each class, float64."""

    sigma: torch.Tensor
    nu: torch.Tensor
    count: int

    @classmethod
    def of(cls, oracles: torch.Tensor, count: int) -> "OracleSums":
        o = oracles[:, :count].double()
        return cls(o.sum(1), (o * o).sum((1, 2)), count)


def _pair_lower_bounds(h_lo: torch.Tensor, h_hi: torch.Tensor, last: nn.Linear, sums: OracleSums,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    """Lower bounds of S_c(z) − S_a(z) over the box of h.

    Returns (B, C, C) for every pair (c, a), or with ``rows`` (B,) class indices a, (B, C)
    for S_c − S_{a_b}. A positive bound means class a is strictly nearer than c everywhere.
    """
    w, b = last.weight.double(), last.bias.double()
    centre, radius = (h_hi + h_lo) / 2, (h_hi - h_lo) / 2
    g = -2.0 * sums.sigma @ w            # (C, H): S_c − S_a = (g_c − g_a)·h + (k_c − k_a)
    kc = -2.0 * sums.sigma @ b + sums.nu  # (C,)
    lin = centre @ g.T + kc               # (B, C): the value at the box centre, up to S_a
    scale = RELATIVE_TOLERANCE * (sums.nu.abs().max() + 1.0)
    if rows is None:
        diff_g = (g[:, None, :] - g[None, :, :]).abs()                 # (C, C, H)
        spread = torch.einsum("bh,cah->bca", radius, diff_g)
        return lin[:, :, None] - lin[:, None, :] - spread - scale
    diff_g = (g[None, :, :] - g[rows][:, None, :]).abs()              # (B, C, H)
    spread = torch.einsum("bh,bch->bc", radius, diff_g)
    return lin - lin.gather(1, rows[:, None]) - spread - scale


class Certifier:
    """Certificates of one Distance NN with one oracle set for Algorithm 1 (n, m, k).

    Holds a float64 copy of the network (interval arithmetic in float32 would round the
    bounds in either direction) and the oracle sums of both steps, so each call costs one
    interval pass through the network plus a few small matrix products.
    """

    def __init__(self, net: nn.Module, oracles: torch.Tensor, n: int, m: int, k: int):
        num_classes = oracles.shape[0]
        if not (1 <= m <= n <= oracles.shape[1] and 1 <= k <= num_classes):
            raise DundiError(f"certify needs 1 <= m <= n <= {oracles.shape[1]} and "
                             f"1 <= k <= {num_classes}; got n={n}, m={m}, k={k}")
        body, last = split_last_linear(net)
        self.body = [copy.deepcopy(layer).double().eval() for layer in body]
        self.last = copy.deepcopy(last).double()
        self.coarse = OracleSums.of(oracles, m)
        self.fine = OracleSums.of(oracles, n)
        self.num_classes, self.k = num_classes, k

    @torch.no_grad()
    def certified_at(self, images: torch.Tensor, labels: torch.Tensor,
                     eps: float | torch.Tensor) -> torch.Tensor:
        """(B,) bool: the rule answers ``labels`` for every input within L∞ distance ``eps``
        (a scalar or one per image) of ``images``, clipped to [0, 1]."""
        lo, hi = input_box(images.double(), eps.double() if torch.is_tensor(eps) else float(eps))
        h_lo, h_hi = propagate(self.body, lo, hi)
        y = labels.long()
        rows = torch.arange(len(y))
        others = torch.ones(len(y), self.num_classes, dtype=torch.bool)
        others[rows, y] = False
        if self.num_classes <= PAIRWISE_CLASS_LIMIT:
            coarse = _pair_lower_bounds(h_lo, h_hi, self.last, self.coarse)        # (B, C, C)
            versus_y = coarse[rows, :, y]
            # a class is out of the top k for certain when k classes are nearer everywhere
            certainly_out = (coarse > 0).sum(2) >= self.k                           # (B, C)
        else:  # C² pairs per query would not fit: every class stays a possible step-2 rival
            versus_y = _pair_lower_bounds(h_lo, h_hi, self.last, self.coarse, rows=y)
            certainly_out = torch.zeros_like(others)
        # step 1: classes that may rank at or above y somewhere in the ball
        rivals = (versus_y <= 0) & others
        keeps_y = rivals.sum(1) <= self.k - 1
        fine = _pair_lower_bounds(h_lo, h_hi, self.last, self.fine, rows=y)         # (B, C)
        threats = others & ~certainly_out & (fine <= 0)
        return keeps_y & ~threats.any(1)

    def radius(self, images: torch.Tensor, labels: torch.Tensor, eps_max: float = 1.0,
               steps: int = RADIUS_STEPS) -> torch.Tensor:
        """(B,) the largest eps (to eps_max / 2**steps, rounded down) at which
        :meth:`certified_at` holds; 0 where even the image itself is not answered ``labels``
        with a strict margin. Interval bounds only widen as the box grows, so certification
        is monotone in eps and bisection finds the threshold."""
        lo = torch.zeros(len(images), dtype=torch.float64)
        hi = torch.full_like(lo, float(eps_max))
        ok0 = self.certified_at(images, labels, 0.0)
        lo[self.certified_at(images, labels, hi)] = eps_max
        for _ in range(steps):
            mid = (lo + hi) / 2
            ok = self.certified_at(images, labels, mid)
            lo = torch.where(ok, mid, lo)
            hi = torch.where(ok, hi, mid)
        return torch.where(ok0, lo, torch.zeros_like(lo))

    def batched(self, images: np.ndarray, labels: np.ndarray, eps: list[float] | None = None,
                radius: bool = False, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Certificates for many images: ``certified`` (B, len(eps)) bools and, with ``radius``,
        ``radius`` (B,). ``labels`` are the labels to certify (the rule's answers, or the truth)."""
        out: dict[str, list] = {"certified": [], "radius": []}
        for start in range(0, len(images), batch_size):
            x = torch.as_tensor(images[start:start + batch_size])
            y = torch.as_tensor(labels[start:start + batch_size])
            if eps:
                out["certified"].append(torch.stack([self.certified_at(x, y, e) for e in eps], 1).numpy())
            if radius:
                out["radius"].append(self.radius(x, y).numpy())
        return {key: np.concatenate(v) for key, v in out.items() if v}


__all__ = ["OracleSums", "Certifier", "RELATIVE_TOLERANCE"]
