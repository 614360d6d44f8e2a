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

import torch
from torch import nn

from dundi.errors import DundiError

Box = tuple[torch.Tensor, torch.Tensor]


def layers_of(net: nn.Module) -> list[nn.Module]:
    """The network as a flat list of leaf layers in forward order.

    A Distance NN is ``backbone`` (an ``nn.Sequential``) then ``embedding.net``; a plain
    ``nn.Sequential`` is flattened recursively. Anything else must be a single leaf layer.
    """
    if hasattr(net, "backbone") and hasattr(net, "embedding"):
        return layers_of(net.backbone) + layers_of(net.embedding.net)
    if isinstance(net, nn.Sequential):
        return [leaf for child in net for leaf in layers_of(child)]
    return [net]


def _affine(layer: nn.Module, centre: torch.Tensor, radius: torch.Tensor) -> Box:
    """Centre and radius of an affine layer's image of a box: W·c + b and |W|·r."""
    if isinstance(layer, nn.Linear):
        return layer(centre), nn.functional.linear(radius, layer.weight.abs())
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise DundiError(f"interval bounds support zero padding only; this Conv2d pads with "
                             f"{layer.padding_mode!r}: use padding_mode='zeros' in a certified network")
        out_r = nn.functional.conv2d(radius, layer.weight.abs(), None, layer.stride, layer.padding,
                                     layer.dilation, layer.groups)
        return layer(centre), out_r
    if isinstance(layer, nn.BatchNorm2d):  # eval mode: a per-channel affine map
        if layer.training:
            raise DundiError("interval bounds need batch norm in eval mode (call model.eval())")
        scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
        return layer(centre), radius * scale.abs()[None, :, None, None]
    raise TypeError(layer)


MONOTONE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)
AFFINE = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)


def propagate(layers: list[nn.Module], lower: torch.Tensor, upper: torch.Tensor) -> Box:
    """Push the box ``[lower, upper]`` through ``layers``; returns the output box."""
    for layer in layers:
        if isinstance(layer, AFFINE):
            centre, radius = _affine(layer, (upper + lower) / 2, (upper - lower) / 2)
            lower, upper = centre - radius, centre + radius
        elif isinstance(layer, MONOTONE):  # non-decreasing in every input: bounds map to bounds
            lower, upper = layer(lower), layer(upper)
        else:
            raise DundiError(f"interval bounds do not support the layer {type(layer).__name__}; "
                             f"certify a network of Linear/Conv2d/BatchNorm2d/ReLU/pooling layers")
    return lower, upper


# ---- the served float32 network: bounds that contain what it computes -------------------

def _fan_in(layer: nn.Module) -> int:
    """Terms in each output's sum: inputs per output plus the bias."""
    if isinstance(layer, nn.Linear):
        return layer.in_features + 1
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return layer.in_channels // layer.groups * kh * kw + 1
    if isinstance(layer, nn.AvgPool2d):
        k = layer.kernel_size
        return (k * k if isinstance(k, int) else k[0] * k[1]) + 1
    return 2


def rounding_slack(layer: nn.Module, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor | None:
    """How far the served float32 layer (any summation order, with or without FMA) and this
    float64 bound computation can each round away from the exact value, for every input in
    [lower, upper]: γ_K (|W|·max|x| + |b|) for a K-term affine sum (Higham, Thm 3.5); None for
    layers that compute exactly (ReLU, max pooling, flatten)."""
    from dundi.exact_rule import U32, U64, gamma

    a = torch.maximum(lower.abs(), upper.abs())
    if isinstance(layer, nn.Linear):
        mag = nn.functional.linear(a, layer.weight.abs(), layer.bias.abs() if layer.bias is not None else None)
    elif isinstance(layer, nn.Conv2d):
        mag = nn.functional.conv2d(a, layer.weight.abs(), None if layer.bias is None else layer.bias.abs(),
                                   layer.stride, layer.padding, layer.dilation, layer.groups)
    elif isinstance(layer, nn.BatchNorm2d):  # alpha = w/sqrt(var+eps), x·alpha + (b − mean·alpha)
        alpha = (layer.weight / torch.sqrt(layer.running_var + layer.eps)).abs()[None, :, None, None]
        mag = (a + layer.running_mean.abs()[None, :, None, None]) * alpha + layer.bias.abs()[None, :, None, None]
        return 16 * (U32 + U64) * mag
    elif isinstance(layer, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        mag = layer(a)
    else:
        return None
    count = _fan_in(layer) if not isinstance(layer, nn.AdaptiveAvgPool2d) else a[0, 0].numel() + 1
    return (gamma(count, U32) + 4 * gamma(count + 1, U64)) * mag


def outward(lower: torch.Tensor, upper: torch.Tensor) -> Box:
    """The box one float64 step wider on each side: covers the rounding of lower and upper."""
    return (torch.nextafter(lower, torch.full_like(lower, -torch.inf)),
            torch.nextafter(upper, torch.full_like(upper, torch.inf)))


def propagate_served(layers: list[nn.Module], lower: torch.Tensor, upper: torch.Tensor,
                     slacks: list | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """:func:`propagate` for float64 ``layers`` of a network that is served in float32: the
    returned box contains every activation the float32 network computes for an input in the
    box, in any batch (docs/certification.md §5). Each layer's box is widened by its
    :func:`rounding_slack`. ``slacks`` from a call on a larger box may be passed back to skip
    their computation (a slack valid for a box is valid for any box inside it); the slacks
    used are returned."""
    record = [] if slacks is None else slacks
    lower, upper = outward(lower, upper)
    for i, layer in enumerate(layers):
        if slacks is None:
            record.append(rounding_slack(layer, lower, upper))
        lower, upper = propagate([layer], lower, upper)
        if record[i] is not None:
            lower, upper = outward(lower - record[i], upper + record[i])
    return lower, upper, record


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


__all__ = ["Box", "layers_of", "propagate", "propagate_served", "rounding_slack", "split_last_linear",
           "input_box", "interval_bounds"]
