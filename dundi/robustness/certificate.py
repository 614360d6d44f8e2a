"""A certificate for the answer a certified run serves: no input in the L∞ ball changes its
label, and (with an abstain gate) none withdraws it as "unknown".

What is proven is the served computation itself (docs/certification.md): the float32
network run by :func:`dundi.rule.exact.embed_invariant`, then Algorithm 1 decided in float64
by :class:`dundi.rule.exact.ExactRule`. Under the squared Euclidean distance a class's summed
distance to t oracles is S_c(z) = t‖z‖² + u_c(z), u_c(z) = ν_c − 2 z·σ_c, and the rule ranks
by u_c. The embedding is z = W h + b (the last Linear layer), so

    u_c − u_a = (g_c − g_a)·h + (κ_c − κ_a),   g_c = −2 Wᵀσ_c,  κ_c = −2 b·σ_c + ν_c,

linear in the penultimate activations h, whose box comes from float32-aware interval bounds
(:func:`dundi.nets.bounds.propagate_served`). Its exact minimum over the box, less an allowance
for every rounding of the served path and of this computation (:meth:`Certifier._pair_bounds`),
is a lower bound that holds for what the server computes, in any batch. The label y is
certified when

1. step 1 keeps y: fewer than k other classes c can reach u^m_c ≤ u^m_y in the ball;
2. step 2 picks y: every other class that can still be kept has u^n_c > u^n_y throughout.

With a :class:`AbstainGate`, no abstain signal may cross its threshold in the ball either.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from dundi.errors import DundiError
from dundi.nets.bounds import ETA32, input_box, outward32, propagate_served, served_layers, split_last_linear
from dundi.rule.abstain_signals import GREY_BAND
from dundi.robustness.verifiers import DEFAULT_VERIFIER, VERIFIERS
from dundi.rule.exact import U32, U64, ClassSums, fixed_sum, gamma, pad_rows
from dundi.rule.index import OracleIndex
from dundi.rule.params import ResolvedRule

RADIUS_STEPS = 12   # bisection steps: radius resolution is eps_max / 2**12
# Up to this many classes step 2's possible rivals are narrowed with all C² coarse pairs;
# beyond it every other class counts as a possible rival (sound, more conservative).
PAIRWISE_CLASS_LIMIT = 64


@dataclasses.dataclass(frozen=True)
class AbstainGate:
    """The served abstain thresholds (None: signal off), as ModelConfig names them. An
    answer abstains when the nearest-oracle distance exceeds ``abstain_threshold``, the
    embedding norm is below ``abstain_min_norm``, or the mid-grey share or mean pixel exceed
    theirs (:mod:`dundi.rule.abstain_signals`)."""

    abstain_threshold: float | None = None
    abstain_min_norm: float | None = None
    abstain_max_grey: float | None = None
    abstain_max_mean: float | None = None
    abstain_min_margin: float | None = None   # bounded by Certifier._selective_slack
    abstain_min_range: float | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


@dataclasses.dataclass
class _Step:
    """One step's sums folded through the last layer: g (C, H), κ (C,), and what the
    rounding allowance needs: |σ_c| (C, D), |ν_c| (C,) and, for C² pairs, |σ_c − σ_a|."""

    sigma: torch.Tensor
    g: torch.Tensor
    kappa: torch.Tensor
    abs_sigma: torch.Tensor
    abs_nu: torch.Tensor
    pair_g: torch.Tensor | None       # (C, C, H) |g_c − g_a|
    pair_sigma: torch.Tensor | None   # (C, C, D) |σ_c − σ_a|

    @classmethod
    def of(cls, sums: ClassSums, w: torch.Tensor, b: torch.Tensor, pairwise: bool) -> "_Step":
        sigma, nu = torch.from_numpy(sums.sigma), torch.from_numpy(sums.nu)
        g = -2.0 * sigma @ w
        return cls(sigma, g, -2.0 * sigma @ b + nu, sigma.abs(), nu.abs(),
                   (g[:, None] - g[None]).abs() if pairwise else None,
                   (sigma[:, None] - sigma[None]).abs() if pairwise else None)


@dataclasses.dataclass
class _HBox:
    """The box of h for a batch, and what the allowance derives from it: the float32 last
    layer's rounding bound ``e`` (B, D) and a bound ``zabs`` on |z| (B, D)."""

    centre: torch.Tensor
    radius: torch.Tensor
    e: torch.Tensor
    zabs: torch.Tensor
    linear: object = None   # a dundi.robustness.linear_bounds.LinearBox with --verifier linear


def served_x_box(images: torch.Tensor, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """The input box of every request within ``eps`` of ``images`` as served (float64 arrays of
    float32 values). The server rounds a float64 (JSON) request to float32, up to half an ulp
    past x ± eps, so the box is the outward-rounded float32 one (the gate signals read it too)."""
    lo, hi = input_box(images.double(), eps.double() if torch.is_tensor(eps) else float(eps))
    return tuple(t.double() for t in outward32(lo, hi))


def served_h_box(body: list, images: torch.Tensor, eps) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """float64 bounds on the activations entering a network's last layer for every input
    within ``eps`` of ``images`` as served, and that input box (:func:`served_x_box`)."""
    lo, hi = served_x_box(images, eps)
    h_lo, h_hi = propagate_served(body, lo, hi)
    return h_lo.double(), h_hi.double(), (lo, hi)


def _linear_verifier(verifier: str, body: list):
    """The body's :class:`~dundi.robustness.linear_bounds.LinearVerifier` for ``verifier``
    "linear", None for "interval"; refuses any other name, and a body it cannot bound."""
    if verifier == "interval":
        return None
    if verifier not in VERIFIERS:
        raise DundiError(f"unknown verifier {verifier!r}: choose {' or '.join(VERIFIERS)}")
    from dundi.robustness.linear_bounds import LinearVerifier
    return LinearVerifier(body)


class Certifier:
    """Certificates of one Distance NN with one oracle set (an :class:`OracleIndex`) for
    Algorithm 1 under a rule that index resolved, for the answers its
    :class:`~dundi.rule.exact.ExactRule` gives on :func:`embed_invariant` embeddings.

    Holds the network's body prepared for float32 bounds that contain what the served
    float32 network computes (:func:`dundi.nets.bounds.propagate_served`), the last layer in
    float64, and the index's own exact rule (its float64 class sums), so the proof and the
    answer read the same numbers: the same object answers and is proven.
    """

    def __init__(self, net: nn.Module, oracles: OracleIndex, rule: ResolvedRule,
                 verifier: str = DEFAULT_VERIFIER):
        if not isinstance(oracles, OracleIndex) or not isinstance(rule, ResolvedRule):
            raise TypeError("a Certifier takes the oracle index and the rule it resolved "
                            "(OracleIndex.resolve(request))")
        exact = oracles.exact_rule(rule)  # checks the rule fits; refuses a non-certifiable one
        num_classes, k = exact.num_classes, rule.k
        body, last = split_last_linear(net)
        self.body = served_layers(body)
        self.linear = _linear_verifier(verifier, self.body)
        self.w = last.weight.detach().double().clone()
        self.b = (last.bias.detach().double().clone() if last.bias is not None
                  else torch.zeros(self.w.shape[0], dtype=torch.float64))
        self.rule, self.exact = rule, exact
        pairwise = num_classes <= PAIRWISE_CLASS_LIMIT
        self.coarse = _Step.of(self.exact.coarse, self.w, self.b, pairwise)
        self.fine = _Step.of(self.exact.fine, self.w, self.b, pairwise)
        self.num_classes, self.k = num_classes, k
        self.bounded = 0   # images pushed through an interval pass so far (bench/certify.py)
        dim, hidden = self.w.shape
        # every float64 rounding of the served rule and of these bounds, relative to the terms
        self.rel = 8 * gamma(hidden + dim + 8, U64)
        self.last_rel = gamma(hidden + 1, U32) + 4 * gamma(hidden + 2, U64)
        # and its underflow (absolute: Higham's relative bound fails for subnormal results);
        # float64 cannot underflow here: every product is of at most six float32 values
        self.last_underflow = 4 * (hidden + 2) * ETA32

    # ---- the box of h and the pair bounds ---------------------------------------------------
    def _box(self, images: torch.Tensor, eps) -> tuple[_HBox, tuple]:
        """The h box for inputs within ``eps`` of ``images``, and the input box itself."""
        if self.linear is None:
            (h_lo, h_hi, (lo, hi)), linear = served_h_box(self.body, images, eps), None
        else:  # the same interval pass, keeping what the backward linear bounds need
            lo, hi = served_x_box(images, eps)
            h_lo, h_hi, linear = self.linear.forward(*(t.float() for t in (lo, hi)))
            h_lo, h_hi = h_lo.double(), h_hi.double()
        a = torch.maximum(h_lo.abs(), h_hi.abs())
        mag = a @ self.w.abs().T + self.b.abs()
        e = self.last_rel * mag + self.last_underflow   # the served float32 last layer's rounding
        return _HBox((h_hi + h_lo) / 2, (h_hi - h_lo) / 2, e, mag + e, linear), (lo, hi)

    def _pair_bounds(self, box: _HBox, step: _Step, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Lower bounds of u_c − u_a over the box, less the rounding allowance: (B, C, C) for
        every pair (c, a), or with ``rows`` (B,) class indices a, (B, C) for u_c − u_{a_b}.
        A positive bound means class a is strictly nearer than c in the served rule."""
        lin = box.centre @ step.g.T + step.kappa                          # (B, C)
        s = 2.0 * box.zabs @ step.abs_sigma.T + step.abs_nu                # (B, C): term sizes
        if rows is None:
            spread = torch.einsum("bh,cah->bca", box.radius, step.pair_g)
            last = 2.0 * torch.einsum("bd,cad->bca", box.e, step.pair_sigma)
            allowance = last + self.rel * (s[:, :, None] + s[:, None, :])
            return lin[:, :, None] - lin[:, None, :] - spread - allowance
        g_a = step.g[rows]                                                  # (B, H)
        spread = torch.einsum("bh,bch->bc", box.radius, (step.g[None] - g_a[:, None]).abs())
        pair_sigma = (step.sigma[None] - step.sigma[rows][:, None]).abs()  # (B, C, D)
        last = 2.0 * torch.einsum("bd,bcd->bc", box.e, pair_sigma)
        allowance = last + self.rel * (s + s.gather(1, rows[:, None]))
        bound = lin - lin.gather(1, rows[:, None]) - spread
        if box.linear is not None:  # the tighter of two lower bounds of (g_c - g_a)·h + κ_c - κ_a
            tight = box.linear.lower(step.g[None] - g_a[:, None], bound <= allowance, key=id(step))
            bound = torch.maximum(bound, tight + step.kappa[None] - step.kappa[rows][:, None])
        return bound - allowance

    def _label_slack(self, box: _HBox, y: torch.Tensor) -> torch.Tensor:
        """(B, 2) margins of §4's two conditions, each positive exactly when it holds: the
        k-th smallest coarse bound of y against another class (step 1 keeps y), and the
        smallest fine bound against a class that may still be kept (step 2 picks y)."""
        rows = torch.arange(len(y))
        others = torch.ones(len(y), self.num_classes, dtype=torch.bool)
        others[rows, y] = False
        if self.num_classes <= PAIRWISE_CLASS_LIMIT:
            coarse = self._pair_bounds(box, self.coarse)                    # (B, C, C)
            versus_y = coarse[rows, :, y]
            if box.linear is not None:  # y's own coarse pairs through the linear bounds too
                versus_y = torch.maximum(versus_y, self._pair_bounds(box, self.coarse, rows=y))
            # a class is out of the top k for certain when k classes are nearer everywhere
            certainly_out = (coarse > 0).sum(2) >= self.k
        else:
            versus_y = self._pair_bounds(box, self.coarse, rows=y)
            certainly_out = torch.zeros_like(others)
        inf = torch.tensor(torch.inf, dtype=torch.float64)
        keeps = torch.where(others, versus_y, inf).kthvalue(self.k, dim=1).values
        fine = self._pair_bounds(box, self.fine, rows=y)
        picks = torch.where(others & ~certainly_out, fine, inf).min(1).values
        return torch.stack([keeps, picks], 1)

    # ---- the abstain gate ---------------------------------------------------------------
    def _gate_slack(self, box: _HBox, x_box: tuple, y: torch.Tensor, gate: AbstainGate) -> torch.Tensor:
        """(B, J) margins, positive exactly where a signal cannot cross its threshold anywhere
        in the ball (given that y is answered, so y is among the kept classes)."""
        lo, hi = (t.reshape(len(t), -1).numpy() for t in x_box)
        up = lambda t: np.nextafter(t, np.inf)      # bound <= t  <=>  up(t) - bound > 0
        down = lambda t: np.nextafter(t, -np.inf)   # bound >= t  <=>  bound - down(t) > 0
        out = []
        if gate.abstain_max_mean is not None:  # the mean is largest at the box's top corner
            pixels = lo.shape[1]
            out.append(up(gate.abstain_max_mean) - fixed_sum(hi) / pixels * (1 + 4 * gamma(pixels + 2, U64)))
        if gate.abstain_max_grey is not None:  # a pixel can turn mid-grey if its range meets the band
            reach = (lo < GREY_BAND[1]) & (hi > GREY_BAND[0])
            out.append(up(gate.abstain_max_grey) - reach.sum(1) / lo.shape[1])
        if gate.abstain_min_norm is not None or gate.abstain_threshold is not None:
            z_lo, z_hi = self._z_box(box)
            rel = 8 * gamma(z_lo.shape[1] + 4, U64)
            if gate.abstain_min_norm is not None:
                gap = np.maximum(0.0, np.maximum(z_lo, -z_hi))
                out.append(np.sqrt(fixed_sum(gap * gap)) * (1 - rel) - down(gate.abstain_min_norm))
            if gate.abstain_threshold is not None:  # y's nearest oracle is at most this far
                o = self.exact.oracles[y.numpy()].astype(np.float64)                   # (B, n, D)
                far = np.maximum((z_lo[:, None] - o) ** 2, (z_hi[:, None] - o) ** 2)
                out.append(up(gate.abstain_threshold) - np.sqrt(fixed_sum(far).min(1)) * (1 + rel))
        return torch.from_numpy(np.stack(out, 1))

    def _selective_slack(self, box: _HBox, x_box: tuple, y: torch.Tensor, gate: AbstainGate
                         ) -> torch.Tensor:
        """(B, J) margins of the selective signals the certificate covers, positive exactly
        where neither can withhold the answer anywhere in the ball (J = 0, 1 or 2):

        - the pixel range is at least max(lo) - min(hi) over the input box (the blank guard);
        - the fine-score margin (u_c - u_y) / n of y over every other kept class is at least
          the smallest lower bound of u_c - u_y over all other classes, kept or not (the same
          bounds, rounding allowance included, that prove step 2 picks y)."""
        out = []
        if gate.abstain_min_range is not None:
            lo, hi = (t.reshape(len(t), -1).numpy() for t in x_box)
            low = lo.max(1) - hi.min(1)
            out.append(np.nextafter(low, -np.inf) - gate.abstain_min_range)
        if gate.abstain_min_margin is not None:
            fine = self._pair_bounds(box, self.fine, rows=y).numpy()               # (B, C)
            fine[np.arange(len(y)), y.numpy()] = np.inf
            per_oracle = fine.min(1) / self.rule.n
            # the served margin is this difference over n in float64 (two roundings); where
            # the bound is negative the slack is negative whatever the (non-negative) threshold
            out.append(per_oracle * (1 - 4 * 2.0 ** -52) - np.nextafter(gate.abstain_min_margin, np.inf))
        if not out:
            return torch.zeros(len(y), 0, dtype=torch.float64)
        return torch.from_numpy(np.stack(out, 1).astype(np.float64))

    def _z_box(self, box: _HBox) -> tuple[np.ndarray, np.ndarray]:
        """A box holding every served float32 embedding for h in the box (float64 arrays)."""
        centre = box.centre @ self.w.T + self.b
        radius = box.radius @ self.w.abs().T + box.e + self.rel * box.zabs
        return (centre - radius).numpy(), (centre + radius).numpy()

    # ---- the public API -------------------------------------------------------------------
    @torch.no_grad()
    def certified_at(self, images: torch.Tensor, labels: torch.Tensor, eps: float | torch.Tensor,
                     gate: AbstainGate | None = None) -> torch.Tensor:
        """(B,) bool: the served rule answers ``labels`` for every input within L∞ distance
        ``eps`` (a scalar or one per image) of ``images``, clipped to [0, 1] -- and, with an
        active ``gate``, never abstains there."""
        return (self._slack(images, labels.long(), eps, gate) > 0).all(1)

    def _slack(self, images, y, eps, gate) -> torch.Tensor:
        """(B, J) margins of every condition: certified where all are positive. Computed on
        the batch padded to a multiple of ROW_BLOCK rows (:func:`pad_rows`), so an image's
        margins -- and so its radius -- are the same bits in any batch."""
        rows = len(images)
        self.bounded += rows
        if torch.is_tensor(eps) and eps.ndim == 1:
            eps = pad_rows(eps)
        return self._margins(pad_rows(images), pad_rows(y), eps, gate)[:rows]

    def _margins(self, images, y, eps, gate) -> torch.Tensor:
        """:meth:`_slack` on a padded batch: the rule's two conditions and the gate's."""
        box, x_box = self._box(images, eps)
        margins = self._label_slack(box, y)
        if gate is not None and gate.active:
            legacy = dataclasses.replace(gate, abstain_min_margin=None, abstain_min_range=None)
            parts = [self._gate_slack(box, x_box, y, gate)] if legacy.active else []
            margins = torch.cat([margins, *parts, self._selective_slack(box, x_box, y, gate)], 1)
        return margins

    @torch.no_grad()
    def radius(self, images: torch.Tensor, labels: torch.Tensor, eps_max: float = 1.0,
               steps: int = RADIUS_STEPS, gate: AbstainGate | None = None) -> torch.Tensor:
        """(B,) the largest eps (to eps_max / 2**steps, rounded down) at which
        :meth:`certified_at` holds; 0 where even the image itself is not certified.

        Bounds only widen as the box grows, so certification is monotone in eps and a
        bracket [certified, not certified] shrinks onto the threshold. Each image's bracket is
        cut where its margins, scaled by their values at eps 0, cross zero on the chord
        (false position, Anderson-Björck variant; a bisection step whenever a cut did not halve the
        bracket), which needs fewer interval passes than bisection's ``steps``."""
        y, count = labels.long(), len(images)
        resolution = eps_max / 2 ** steps
        # Each pass computes its own rounding slacks: those of the largest box are sound for
        # smaller ones, but at eps_max = 1 they are the whole pixel range's and would swamp
        # the margins (and the abstain gate) near eps 0.
        top = self._slack(images, y, eps_max, gate)
        zero = self._slack(images, y, 0.0, gate)
        scale = torch.where(torch.isfinite(zero) & (zero > 0), zero, torch.ones_like(zero))
        # margins scaled by their value at eps 0, through asinh: they fall slowly, then plunge
        # as interval bounds blow up; asinh makes the chord a fair guess on both stretches
        level = lambda m, s: torch.asinh(torch.nan_to_num(m / s, posinf=1e6).min(1).values)
        lo = torch.zeros(count, dtype=torch.float64)
        hi = torch.full_like(lo, float(eps_max))
        certified_top = (top > 0).all(1)
        lo[certified_top] = eps_max
        active = ~certified_top & (zero > 0).all(1)
        f_lo, f_hi = torch.ones_like(lo), level(top, scale)
        moved = torch.zeros(count, dtype=torch.int8)     # +1 lo moved last, -1 hi moved last
        bisect = torch.zeros(count, dtype=torch.bool)
        for _ in range(4 * steps):
            idx = torch.nonzero(active & (hi - lo > resolution)).flatten()
            if not len(idx):
                break
            a, b, fa, fb = lo[idx], hi[idx], f_lo[idx], f_hi[idx]
            cut = torch.where(bisect[idx], (a + b) / 2, a + (b - a) * fa / (fa - fb))
            cut = torch.minimum(torch.maximum(cut, a + resolution / 2), b - resolution / 2)
            margins = self._slack(images[idx], y[idx], cut, gate)
            ok, f = (margins > 0).all(1), level(margins, scale[idx])
            # Anderson-Björck: an end kept twice in a row has its value scaled down, so the
            # chord turns towards it
            shrink_hi = torch.where(1 - f / fa > 0, 1 - f / fa, torch.full_like(f, 0.5))
            shrink_lo = torch.where(1 - f / fb > 0, 1 - f / fb, torch.full_like(f, 0.5))
            f_hi[idx] = torch.where(ok, torch.where(moved[idx] > 0, fb * shrink_hi, fb), f)
            f_lo[idx] = torch.where(ok, f, torch.where(moved[idx] < 0, fa * shrink_lo, fa))
            lo[idx], hi[idx] = torch.where(ok, cut, a), torch.where(ok, b, cut)
            moved[idx] = torch.where(ok, 1, -1).to(torch.int8)
            bisect[idx] = hi[idx] - lo[idx] > (b - a) / 2
        return lo

    def batched(self, images: np.ndarray, labels: np.ndarray, eps: list[float] | None = None,
                radius: bool = False, batch_size: int = 256, gate: AbstainGate | None = None
                ) -> dict[str, np.ndarray]:
        """Certificates for many images: ``certified`` (B, len(eps)) bools and, with ``radius``,
        ``radius`` (B,). ``labels`` are the labels to certify (the rule's answers, or the truth)."""
        out: dict[str, list] = {"certified": [], "radius": []}
        for start in range(0, len(images), batch_size):
            x = torch.as_tensor(np.ascontiguousarray(images[start:start + batch_size]))
            y = torch.as_tensor(labels[start:start + batch_size])
            if eps:
                out["certified"].append(torch.stack(
                    [self.certified_at(x, y, e, gate) for e in eps], 1).numpy())
            if radius:
                out["radius"].append(self.radius(x, y, gate=gate).numpy())
        return {key: np.concatenate(v) for key, v in out.items() if v}


__all__ = ["AbstainGate", "Certifier", "RADIUS_STEPS"]
