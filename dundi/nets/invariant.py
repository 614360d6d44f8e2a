"""A network's forward pass whose every row is the same bits in any batch and at any thread count.

Why: an attack's trajectory for one image is a chain of forward and backward passes; if a row's
scores or gradient change in the last bit with the batch it is computed in, the same image
attacked in a shard of 8 and in a shard of 12 (or by 1 and 2 torch threads) ends at another
adversarial point and, near a decision boundary, gets another label. Measured on the LeNet-5
Distance NN of the tests: ``nn.Linear`` (a BLAS product) gives other bits per row for batches
of 5, 7, 8, 16, 17 and 32 than for the row alone, and other bits again with 2 threads; the
convolutions do not. :func:`dundi.rule.exact.invariant_linear` computes a Linear layer as a
1×1 convolution, whose forward does not depend on the batch; larger batches go through in
chunks of :data:`CHUNK` rows, for which the backward did not either (one torch thread). The
thread count still changes the bits (2 threads against 1, even for a single row): the
evaluation computes with one torch thread in every layout and gets its parallelism from
concurrent shards (:func:`dundi.evaluation.evaluate.evaluate_local`, Ray actors).

:class:`InvariantForward` runs a network's flat layer list (:func:`dundi.nets.bounds.layers_of`)
that way; it is differentiable (attacks take gradients through it) and computes the same
function as the network, to float32 rounding. A network that is not a flat list of leaf
layers is run as it is (its answer is right, only not batch-invariant).
"""

from __future__ import annotations

import torch
from torch import nn

from dundi.nets.bounds import layers_of
from dundi.rule.exact import INVARIANT_ROWS as CHUNK, invariant_linear


def flat_layers(net: nn.Module) -> list[nn.Module] | None:
    """The network as leaf layers in forward order, or None where it is not one (a model with
    its own forward, e.g. residual connections, is not a chain of its leaves)."""
    if hasattr(net, "features") and isinstance(getattr(net, "head", None), nn.Linear):  # a NativeNet
        features = flat_layers(net.features)
        return None if features is None else [*features, net.head]
    layers = layers_of(net)
    if len(layers) == 1 and layers[0] is net and any(True for _ in net.children()):
        return None
    return layers


class InvariantForward(nn.Module):
    """``net``'s forward, every row the same bits whatever else is in its batch (see the module
    docstring). A batch of one is computed as a batch of two: the kernels take another path for
    a single row."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._layers = flat_layers(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._layers is None:
            return self.net(x)
        if len(x) > CHUNK:  # autograd keeps the chunks: the backward runs chunk by chunk too
            return torch.cat([self._chunk(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)])
        return self._chunk(x)

    def _chunk(self, x: torch.Tensor) -> torch.Tensor:
        single = len(x) == 1
        h = torch.cat([x, x]) if single else x
        for layer in self._layers:
            h = invariant_linear(h, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer(h)
        return h[:1] if single else h


def invariant(net: nn.Module | None) -> nn.Module | None:
    """``net`` wrapped in :class:`InvariantForward` (None stays None; a wrapped net is not
    wrapped twice)."""
    if net is None or isinstance(net, InvariantForward):
        return net
    return InvariantForward(net).eval()


__all__ = ["InvariantForward", "invariant", "flat_layers"]
