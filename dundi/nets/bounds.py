"""Interval bound propagation (IBP, Gowal et al. 2018) through a Distance NN.

Given every input in a box ``[lower, upper]`` (the L∞ ball around an image, clipped to the
pixel range), :func:`interval_bounds` returns a box that contains every activation the
network can produce there. It is exact layer by layer for affine maps (centre ± |W|·radius)
and monotone maps (ReLU, max pooling), so the result is sound; it is not tight, which is why
certified training (``dundi.certified``) trains the network *through* these bounds.

The last Linear layer is not propagated as a box: :func:`split_last_linear` hands it to the
certificate, which folds it into the (linear) score differences of Algorithm 1 under the
squared Euclidean distance — IBP's "elided last layer", exact over the penultimate box.

Only layers with a sound interval rule are accepted; anything else is refused by name rather
than silently mis-bounded.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
from torch import nn

from dundi.errors import DundiError
from dundi.rule.exact import U32, gamma, invariant_linear

Box = tuple[torch.Tensor, torch.Tensor]


# Networks made of parts, by exact type -> their parts in forward order. dundi.nets.models
# registers its Distance NN, Embedding module and native network here (it imports this module,
# so this one cannot import it); a subclass, which may have its own forward, is not found and
# so stays a leaf, refused by the bounds.
COMPOSITES: dict[type, Callable[[nn.Module], list[nn.Module]]] = {nn.Sequential: lambda net: list(net)}


def layers_of(net: nn.Module) -> list[nn.Module]:
    """The network as a flat list of leaf layers in forward order: the parts of a registered
    composite (:data:`COMPOSITES`: ``nn.Sequential``, a Distance NN's backbone then embedding,
    a native network's features then head), flattened recursively; anything else is a leaf."""
    parts = COMPOSITES.get(type(net))
    if parts is None:
        return [net]
    return [leaf for part in parts(net) for leaf in layers_of(part)]


def _affine(layer: nn.Module, centre: torch.Tensor, radius: torch.Tensor) -> Box:
    """Centre and radius of an affine layer's image of a box: W·c + b and |W|·r."""
    if type(layer) is nn.Linear:
        return layer(centre), nn.functional.linear(radius, layer.weight.abs())
    if type(layer) is nn.Conv2d:
        if layer.padding_mode != "zeros":
            raise DundiError(f"interval bounds support zero padding only; this Conv2d pads with "
                             f"{layer.padding_mode!r}: use padding_mode='zeros' in a certified network")
        out_r = nn.functional.conv2d(radius, layer.weight.abs(), None, layer.stride, layer.padding,
                                     layer.dilation, layer.groups)
        return layer(centre), out_r
    if type(layer) is nn.BatchNorm2d:  # eval mode: a per-channel affine map
        if layer.training:
            raise DundiError("interval bounds need batch norm in eval mode (call model.eval())")
        scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
        return layer(centre), radius * scale.abs()[None, :, None, None]
    raise TypeError(layer)


# Matched by exact type, never isinstance: a subclass may override forward, and bounding it
# as its parent would be unsound; anything not listed is refused by name (refuse_layer).
MONOTONE = frozenset({nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity})
AFFINE = frozenset({nn.Linear, nn.Conv2d, nn.BatchNorm2d})
ETA32 = 2.0 ** -149  # the smallest float32 subnormal: twice the largest absolute error of one
                     # rounded float32 operation in the gradual-underflow range


def refuse_layer(layer: nn.Module) -> DundiError:
    """The one refusal for a layer interval bounds do not know (by its exact type)."""
    kind = type(layer)
    parent = next((b.__name__ for b in kind.__mro__[1:] if b in AFFINE | MONOTONE), None)
    why = f" (a subclass of {parent}, which may compute otherwise)" if parent else ""
    return DundiError(f"interval bounds do not support the layer {kind.__module__}.{kind.__name__}{why}; "
                      f"certify a network of plain torch.nn Linear/Conv2d/BatchNorm2d/ReLU/pooling layers")


def propagate(layers: list[nn.Module], lower: torch.Tensor, upper: torch.Tensor) -> Box:
    """Push the box ``[lower, upper]`` through ``layers``; returns the output box."""
    for layer in layers:
        if type(layer) in AFFINE:
            centre, radius = _affine(layer, (upper + lower) / 2, (upper - lower) / 2)
            lower, upper = centre - radius, centre + radius
        elif type(layer) in MONOTONE:  # non-decreasing in every input: bounds map to bounds
            lower, upper = layer(lower), layer(upper)
        else:
            raise refuse_layer(layer)
    return lower, upper


# ---- the served float32 network: bounds that contain what it computes -------------------
#
# The certificate must hold for the float32 network the server runs, in whatever order its
# kernels sum. These bounds are computed in float32 too (twice as fast as float64, which the
# CPU convolution kernels do not accelerate), so each affine layer's box is widened by
# rounding terms that cover both the served computation and this one (docs/certification.md §5).

@dataclasses.dataclass
class ServedLayer:
    """One float32 layer as served, with what its bounds need kept once: |W| and |b| (for
    batch norm, the per-channel |scale| and |shift| + |mean·scale|), its terms per sum and its
    absolute underflow allowance per output (:func:`_underflow`)."""

    layer: nn.Module
    abs_weight: torch.Tensor | None = None
    abs_bias: torch.Tensor | None = None
    terms: int = 0
    underflow: torch.Tensor | float = 0.0

    def abs_map(self, x: torch.Tensor) -> torch.Tensor:
        """|W| x without the bias."""
        layer = self.layer
        if type(layer) is nn.Linear:
            return invariant_linear(x, self.abs_weight)
        if type(layer) is nn.Conv2d:
            return nn.functional.conv2d(x, self.abs_weight, None, layer.stride, layer.padding,
                                        layer.dilation, layer.groups)
        return x * self.abs_weight  # batch norm: a per-channel scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The layer itself, with Linear layers computed batch-invariantly as served."""
        if type(self.layer) is nn.Linear:
            return invariant_linear(x, self.layer.weight, self.layer.bias)
        return self.layer(x)


def _underflow(terms: int, abs_row: torch.Tensor | float) -> torch.Tensor | float:
    """Absolute allowance per output of an affine layer for rounding in the subnormal range,
    where Higham's relative bound does not hold (fl(x·y) = x·y(1 + δ) + η, |η| ≤ ETA32 / 2):
    one η per product or fused step of the served sum and of the bound's own, and one per
    coordinate of the rounded centre and radius carried through |W| (``abs_row`` = Σ_j |W_ij|),
    doubled for the rounding of these terms themselves."""
    return ETA32 * (2 * (terms + 2) + 2 * abs_row) * 2


def served_layers(layers: list[nn.Module]) -> list[ServedLayer]:
    """float32 copies of ``layers`` prepared for :func:`propagate_served`; refuses what
    :func:`propagate` refuses, by exact type (:func:`refuse_layer`)."""
    out = []
    for layer in layers:
        kind = type(layer)
        if kind not in AFFINE and kind not in MONOTONE:
            raise refuse_layer(layer)
        layer = copy.deepcopy(layer).float().eval()
        if kind in (nn.Linear, nn.Conv2d):
            if kind is nn.Conv2d and layer.padding_mode != "zeros":
                raise DundiError(f"interval bounds support zero padding only; this Conv2d pads with "
                                 f"{layer.padding_mode!r}: use padding_mode='zeros' in a certified network")
            bias = None if layer.bias is None else layer.bias.detach().abs()
            kh, kw = (1, 1) if kind is nn.Linear else layer.kernel_size
            fan = layer.in_features if kind is nn.Linear else layer.in_channels // layer.groups * kh * kw
            abs_w = layer.weight.detach().abs()
            abs_row = abs_w.double().flatten(1).sum(1)                    # Σ_j |W_ij| per output
            shape = (1, -1) if kind is nn.Linear else (1, -1, 1, 1)
            under = _underflow(fan + 1, abs_row).float().view(shape)
            out.append(ServedLayer(layer, abs_w, bias, fan + 1, under * (1 + 1e-3)))
        elif kind is nn.BatchNorm2d:
            scale = (layer.weight / torch.sqrt(layer.running_var + layer.eps)).detach()
            shift = (layer.bias.abs() + (layer.running_mean * scale).abs()).detach()
            under = _underflow(16, scale.double().abs()).float() * (1 + 1e-3)
            out.append(ServedLayer(layer, scale.abs()[None, :, None, None], shift[None, :, None, None], 16,
                                   under[None, :, None, None]))
        elif kind in (nn.AvgPool2d, nn.AdaptiveAvgPool2d):
            out.append(ServedLayer(layer, terms=-1))
        else:
            out.append(ServedLayer(layer))
    return out


def outward32(lower64: torch.Tensor, upper64: torch.Tensor) -> Box:
    """float32 bounds that contain the float64 box ``[lower64, upper64]``."""
    lo, hi = lower64.float(), upper64.float()
    lo = torch.where(lo.double() > lower64, torch.nextafter(lo, torch.full_like(lo, -torch.inf)), lo)
    hi = torch.where(hi.double() < upper64, torch.nextafter(hi, torch.full_like(hi, torch.inf)), hi)
    return lo, hi


_outward32 = outward32  # the earlier private name


def _served_affine(sl: ServedLayer, lower: torch.Tensor, upper: torch.Tensor) -> Box:
    """One affine layer's float32 box, widened by its rounding slack."""
    centre, radius = (upper + lower) / 2, (upper - lower) / 2
    out_c = sl(centre)
    both = sl.abs_map(torch.cat([radius, centre.abs() + radius]))
    out_r, reach = both[:len(radius)], both[len(radius):]
    if sl.abs_bias is not None:
        reach = reach + (sl.abs_bias if sl.abs_bias.ndim == 4 else
                         sl.abs_bias.view(1, -1, *([1] * (reach.ndim - 2))))
    # reach = |W|·max|x| + |b| bounds |W c + b|, |W| r and every partial sum, so one multiple of
    # it covers: the served sum's rounding and this one's (γ_K each, Higham Thm 3.5), the
    # rounding of c and r (2u, through |W|) and of c ± r here (≈ 9u); in the subnormal range
    # Higham's relative bound fails, so an absolute term per output covers underflow
    out_r = out_r + (2.5 * gamma(sl.terms + 2, U32) + 12 * U32) * reach + sl.underflow
    return out_c - out_r, out_c + out_r


def propagate_served(layers: list[ServedLayer], lower: torch.Tensor, upper: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds (float32) that contain every activation the float32 network computes, in any
    summation order, for an input in the float64 box ``[lower, upper]``."""
    lower, upper = outward32(lower, upper)
    for sl in layers:
        if sl.abs_weight is not None:
            lower, upper = _served_affine(sl, lower, upper)
        elif sl.terms < 0:  # average pooling: an average of up to K values, rounded
            reach = sl(torch.maximum(lower.abs(), upper.abs()))
            terms = reach[0].numel() + lower[0].numel() + 2
            slack = 2.5 * gamma(terms, U32) * reach + 4 * ETA32 * terms  # relative + underflow
            lower, upper = sl(lower) - slack, sl(upper) + slack
        else:  # ReLU, max pooling, flatten: exact in floating point
            lower, upper = sl(lower), sl(upper)
    return lower, upper


def split_last_linear(net: nn.Module) -> tuple[list[nn.Module], nn.Linear]:
    """The layers before the network's final Linear layer, and that layer."""
    layers = layers_of(net)
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise DundiError("certification needs a network whose last layer is Linear "
                         "(the Distance NN's embedding output)")
    return layers[:-1], layers[-1]


def input_box(x: torch.Tensor, eps: float | torch.Tensor, low: float = 0.0, high: float = 1.0) -> Box:
    """The L∞ ball of radius ``eps`` around ``x`` intersected with the pixel range.

    ``eps`` may be a scalar or one value per sample (shape (B,)).
    """
    e = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if e.ndim == 1:
        e = e.view(-1, *([1] * (x.ndim - 1)))
    return (x - e).clamp(low, high), (x + e).clamp(low, high)


def interval_bounds(net: nn.Module, lower: torch.Tensor, upper: torch.Tensor) -> Box:
    """Bounds on the whole network's output (the embedding) for inputs in the box."""
    return propagate(layers_of(net), lower, upper)


__all__ = ["Box", "layers_of", "propagate", "ETA32", "AFFINE", "MONOTONE", "refuse_layer", "ServedLayer", "served_layers", "propagate_served", "outward32",
           "split_last_linear", "input_box", "interval_bounds"]
