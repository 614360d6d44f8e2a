"""Backward linear bounds (CROWN-IBP, Zhang et al. 2020) through the served network's body:
a tighter verifier for the certificate's pair margins, sound for the float32 network as served.

The certificate (:mod:`dundi.robustness.certificate`) proves each margin of the two-step rule
as a lower bound of g·h + κ over the served penultimate activations h, g = (g_c − g_a) linear
in h. The interval verifier minimises g·h over h's interval box, which loses every correlation
between the coordinates of h. Here g is carried backwards through the body instead, layer by
layer, to a linear function of the input, minimised exactly over the input box:

- an affine layer as served computes ã = W a + b + e with |e| ≤ δ elementwise, δ the same
  rounding allowance the interval pass widens its boxes by (:func:`dundi.nets.bounds.propagate_served`,
  from |W|·max|a| + |b| over a's interval box), so λ·ã ≥ (Wᵀλ)·a + λ·b − |λ|·δ;
- a ReLU y = max(x, 0), exact in float32, with x in its served interval box [l, u] (CROWN-IBP:
  the intermediate bounds are the interval pass's): y ≥ 0 where λ > 0 (or CROWN's adaptive
  y ≥ x where u > −l: :data:`RELAXATIONS`), y ≤ u(x − l)/(u − l) where λ < 0, and y = x or 0
  for stable units;
- Flatten and Identity reshape or pass λ unchanged;
- the input is the float32 request inside the outward-rounded box: λ·x ≥ Σ λ⁺lo + λ⁻hi;
- after each layer the running linear function is also minimised over that layer's input box
  (every served value lies in it), and the best of these stops is the bound.

Each step is an inequality for the computed (float64) coefficients themselves, so their own
rounding only enters through the sums; every sum here is of terms bounded by the running
``mass`` (Σ|λ|·magnitude over every layer), and γ of the total term count times that mass
is subtracted at the end. Any layer without such a rule is refused by name
(:func:`refuse_linear`): the verifier never bounds what it does not know.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dundi.errors import DundiError
from dundi.nets.bounds import ServedLayer, propagate_served
from dundi.rule.exact import U32, U64, gamma

# Matched by exact type, as the interval bounds match theirs (dundi.nets.bounds.refuse_layer)
LINEAR_AFFINE = frozenset({nn.Linear, nn.Conv2d})
LINEAR_PASSIVE = frozenset({nn.ReLU, nn.Flatten, nn.Identity})
# Lower lines of unstable ReLUs tried (each a whole backward pass; the best bound is kept):
# y ≥ 0 measured best on an interval-trained network (cert30 dundi-e10-proto, 256 test images
# at eps 0.3: 187 certified, against 183 with CROWN's adaptive y ≥ x or 0 and 187 with both)
RELAXATIONS = (False,)
SPEC_ROWS = 1024   # (image, specification) rows carried backwards at once: bounds memory


def refuse_linear(layers: list[ServedLayer]) -> None:
    """Raise the one-line refusal for the first layer the linear verifier has no rule for."""
    for sl in layers:
        kind = type(sl.layer)
        if kind not in LINEAR_AFFINE and kind not in LINEAR_PASSIVE:
            raise DundiError(f"the linear verifier does not support the layer {kind.__module__}.{kind.__name__}: "
                             f"it bounds Linear/Conv2d/ReLU/Flatten networks (cnn-ibp, cnn-ibp-medium, "
                             f"cnn7); certify this run with --verifier interval")


def _allowance_rate(sl: ServedLayer) -> float:
    """The served layer's rounding allowance per unit of reach, as the interval pass takes it."""
    return 2.5 * gamma(sl.terms + 2, U32) + 12 * U32


@dataclasses.dataclass
class _Affine:
    """One affine layer in float64 for the backward pass."""

    layer: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    abs_weight: torch.Tensor
    rate: float
    underflow: torch.Tensor | float

    def reach(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """|W|·max(|lo|, |hi|) + |b| (float64): bounds every term of the layer's sums."""
        a = torch.maximum(lo.double().abs(), hi.double().abs())
        if type(self.layer) is nn.Linear:
            out = a @ self.abs_weight.T
        else:
            c = self.layer
            out = nn.functional.conv2d(a, self.abs_weight, None, c.stride, c.padding, c.dilation, c.groups)
        if self.bias is not None:
            out = out + self.bias.abs().view(1, -1, *([1] * (out.ndim - 2)))
        return out

    def back(self, lam: torch.Tensor, in_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(Wᵀλ over the layer's input, λ·b per row) for λ rows (R, *out_shape)."""
        if type(self.layer) is nn.Linear:
            new = lam @ self.weight
        else:
            c = self.layer
            new = nn.grad.conv2d_input((len(lam), *in_shape), self.weight, lam, c.stride, c.padding,
                                       c.dilation, c.groups)
        if self.bias is None:
            return new, torch.zeros(len(lam), dtype=torch.float64)
        b = self.bias.view(1, -1, *([1] * (lam.ndim - 2)))
        return new, (lam * b).flatten(1).sum(1)


class LinearVerifier:
    """The body of a certified network (its served layers, :func:`dundi.nets.bounds.served_layers`)
    prepared for backward linear bounds; refuses a layer it has no rule for."""

    def __init__(self, served: list[ServedLayer]):
        refuse_linear(served)
        self.served = served
        self.affine: dict[int, _Affine] = {}
        for i, sl in enumerate(served):
            if type(sl.layer) in LINEAR_AFFINE:
                w = sl.layer.weight.detach().double()
                b = None if sl.layer.bias is None else sl.layer.bias.detach().double()
                under = sl.underflow.double() if torch.is_tensor(sl.underflow) else float(sl.underflow)
                self.affine[i] = _Affine(sl.layer, w, b, w.abs(), _allowance_rate(sl), under)

    def forward(self, lo32: torch.Tensor, hi32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, "LinearBox"]:
        """The interval pass of :func:`propagate_served` (the same bits: one layer at a time),
        keeping each layer's input box, and the :class:`LinearBox` that bounds with them."""
        boxes = []
        lo, hi = lo32, hi32
        for sl in self.served:
            boxes.append((lo, hi))
            lo, hi = propagate_served([sl], lo, hi)
        return lo, hi, LinearBox(self, boxes, lo[0].numel())


class LinearBox:
    """The boxes of one batch of inputs, and lower bounds of linear functions of its served
    body output h (:meth:`lower`)."""

    def __init__(self, verifier: LinearVerifier, boxes: list[tuple[torch.Tensor, torch.Tensor]], out_size: int):
        self.verifier, self.boxes = verifier, boxes
        self.cache: dict[tuple, torch.Tensor] = {}
        # each layer's rounding allowance δ and reach, once per batch
        self.delta: dict[int, torch.Tensor] = {}
        self.reach: dict[int, torch.Tensor] = {}
        for i, aff in verifier.affine.items():
            r = aff.reach(*boxes[i])
            self.reach[i] = r
            self.delta[i] = aff.rate * r + aff.underflow
        # the longest sum here: over one layer's inputs or outputs (a dot product, a transposed
        # map, a concretisation) or the running constant over all layers; bounded by all together
        terms = out_size + sum(lo[0].numel() for lo, _ in boxes) + sum(sl.terms for sl in verifier.served if sl.terms > 0)
        self.rel = 4 * gamma(terms + 8 * len(boxes) + 64, U64)

    def lower(self, g: torch.Tensor, need: torch.Tensor, key: object = None) -> torch.Tensor:
        """(B, S) float64 lower bounds of g[b, s]·h over every served output h of the body for
        an input of image b's box, where ``need`` (B, S) is true; −inf elsewhere (the caller's
        interval bound already settles those). ``g`` (B, S, H); ``key`` memoises per batch."""
        if key is not None and key in self.cache:
            return self.cache[key]
        out = torch.full(need.shape, -torch.inf, dtype=torch.float64)
        which = torch.nonzero(need & (g.abs().amax(2) > 0))   # a zero row (c = a) bounds nothing
        for start in range(0, len(which), SPEC_ROWS):
            image, spec = which[start:start + SPEC_ROWS].T
            out[image, spec] = self._lower_rows(g[image, spec].double(), image)
        if key is not None:
            self.cache[key] = out
        return out

    def _lower_rows(self, lam: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(R,) lower bounds of lam[r]·h for the input box of batch row image[r]; lam (R, H):
        the better of the relaxations in :data:`RELAXATIONS`."""
        return torch.stack([self._relaxed(lam, image, adaptive) for adaptive in RELAXATIONS]).amax(0)

    def _relaxed(self, lam: torch.Tensor, image: torch.Tensor, adaptive: bool) -> torch.Tensor:
        """:meth:`_lower_rows` through one choice of lower lines (:func:`_relu_back`)."""
        pick = lambda t: t[image].double()   # each row's own box
        const = torch.zeros(len(lam), dtype=torch.float64)
        mass = torch.zeros_like(const)
        best = torch.full_like(const, -torch.inf)
        for i in reversed(range(len(self.verifier.served))):
            kind = type(self.verifier.served[i].layer)
            lo, hi = self.boxes[i]
            if kind in LINEAR_AFFINE:
                slack = (lam.abs() * pick(self.delta[i])).flatten(1).sum(1)
                mass += (lam.abs() * pick(self.reach[i])).flatten(1).sum(1) + slack
                const -= slack
                lam, bias = self.verifier.affine[i].back(lam, lo.shape[1:])
                const += bias
            elif kind is nn.ReLU:
                lam, shift, size = _relu_back(lam, pick(lo), pick(hi), adaptive)
                const += shift
                mass += size
            elif kind is nn.Flatten:
                lam = lam.reshape(len(lam), *lo.shape[1:])
            # λ now acts on layer i's input, whose served values lie in its interval box: that
            # box bounds it too, and the best of these stops is a lower bound (the input's last)
            best = torch.maximum(best, _concretise(lam, pick(lo), pick(hi), const, mass, self.rel))
        return best


def _concretise(lam: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, const: torch.Tensor,
                mass: torch.Tensor, rel: float) -> torch.Tensor:
    """min of lam·x + const over the box [lo, hi], less ``rel`` times every term's size."""
    bound = (lam.clamp(min=0) * lo + lam.clamp(max=0) * hi).flatten(1).sum(1) + const
    size = mass + (lam.abs() * torch.maximum(lo.abs(), hi.abs())).flatten(1).sum(1)
    return bound - rel * size


def _relu_back(lam: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, adaptive: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """λ through y = ReLU(x), x ∈ [lo, hi], for a lower bound of λ·y: (λ on x, the constant,
    the mass Σ|λ|·max(|lo|, |hi|) that bounds every term's size). An unstable unit's lower
    line is y ≥ 0, or with ``adaptive`` y ≥ x where hi > −lo (CROWN's choice)."""
    unstable = (lo < 0) & (hi > 0)
    active = lo >= 0
    width = torch.where(unstable, hi - lo, torch.ones_like(hi))
    upper = torch.where(unstable, hi / width, active.double())           # slope of the upper line
    slope = (hi > -lo).double() if adaptive else torch.zeros_like(hi)
    lower = torch.where(unstable, slope, active.double())                # slope of the lower line
    pos, neg = lam.clamp(min=0), lam.clamp(max=0)
    shift = (neg * torch.where(unstable, -upper * lo, torch.zeros_like(lo))).flatten(1).sum(1)
    size = (lam.abs() * torch.maximum(lo.abs(), hi.abs())).flatten(1).sum(1)
    return pos * lower + neg * upper, shift, size


__all__ = ["LINEAR_AFFINE", "LINEAR_PASSIVE", "LinearVerifier", "LinearBox", "refuse_linear"]
