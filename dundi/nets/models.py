"""Native softmax models of the paper and the Distance NN built on them.

Every native model is split into ``features`` (the network with its logit layer removed:
the paper's "DNN module") and ``head`` (the logit layer). The Distance NN puts the
two-layer Embedding module on top of ``features``. DunDi_R trains it all; DunDi_P copies
a trained native model's ``features``, freezes them and trains only the embedding.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from dundi.nets.bounds import COMPOSITES, propagate, split_last_linear
from dundi.nets.names import ARCHITECTURES

EMBED_DIM = 128


class NativeNet(nn.Module):
    """features → head. ``forward`` returns logits (no softmax: attacks want logits)."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Logits; with ``box`` (lower, upper input bounds) also interval bounds on the
        features entering ``head``, for certified training (as :class:`DistanceNet`)."""
        logits = self.head(self.features(x))
        if box is None:
            return logits
        h_lo, h_hi = propagate(split_last_linear(self)[0], *box)
        return logits, h_lo, h_hi


def _flat_dim(features: nn.Module, in_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *in_shape)).shape[1])


def _lenet1(c: int) -> nn.Sequential:
    # DeepXplore Model1 (LeNet-1): 4 and 12 feature maps, no hidden dense layer.
    return nn.Sequential(
        nn.Conv2d(c, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 12, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )


def _lenet4(c: int) -> nn.Sequential:
    # DeepXplore Model2 (LeNet-4): 6 and 16 feature maps, one 84-unit dense layer.
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.LazyLinear(84), nn.ReLU(),
    )


def _lenet5(c: int) -> nn.Sequential:
    # DeepXplore Model3 (LeNet-5): 6 and 16 feature maps, 120- and 84-unit dense layers.
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.LazyLinear(120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
    )


def _cnn_ibp(c: int) -> nn.Sequential:
    # A small CNN for certified training: strided convolutions instead of max pooling and no
    # batch norm, so interval bounds stay tight (cf. the IBP models of Gowal et al. 2018).
    return nn.Sequential(
        nn.Conv2d(c, 32, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
    )


def _cnn_ibp_medium(c: int) -> nn.Sequential:
    # The "medium" CNN of the IBP paper (Gowal et al. 2018) as a backbone: four convolutions,
    # two of them strided (28 -> 14 -> 7), 64 maps at the end, no pooling and no batch norm.
    # About 3.6x the multiply-adds of cnn-ibp per image, for more capacity under the bounds.
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
    )


def _cnn7(c: int) -> nn.Sequential:
    # CNN7 of the certified-training literature (SABR, MTL-IBP: convolutions of 64, 64, 128,
    # 128, 128 maps, the third strided) without its batch norm, which the interval bounds here
    # take in eval mode only; the 512-unit dense layer is the Embedding module's hidden layer.
    # About 40x the multiply-adds of cnn-ibp: the network of the GPU recipe (bench/gpu_certified.sh).
    return nn.Sequential(
        nn.Conv2d(c, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
        nn.Flatten(),
    )


def _vgg16(c: int) -> nn.Sequential:
    # VGG-16 for 32x32 inputs as commonly used on CIFAR-10 (with batch norm), 512-d features.
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
            c = int(v)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def _feinman_cnn(c: int) -> nn.Sequential:
    # The MNIST network of Feinman et al. 2017 ("Detecting adversarial samples from artifacts"),
    # whose code crafted the DunDi paper's adversarial sets: two unpadded 3x3 convolutions of
    # 64 maps, 2x2 max pooling, dropout 0.5, a 128-unit dense layer and dropout 0.5 before the
    # logits. The source model of the shared-source transfer protocol (`dundi transfer`).
    return nn.Sequential(
        nn.Conv2d(c, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(128), nn.ReLU(), nn.Dropout(0.5),
    )


# One builder per name of dundi.nets.names, in its order (the names are written there only).
BUILDERS: dict[str, Callable[[int], nn.Sequential]] = dict(zip(
    ARCHITECTURES, (_lenet1, _lenet4, _lenet5, _cnn_ibp, _cnn_ibp_medium, _cnn7, _vgg16, _feinman_cnn),
    strict=True))


def _features(arch: str, in_shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
    if arch not in ARCHITECTURES:
        from dundi.errors import DundiError

        raise DundiError(f"unknown model {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    features = BUILDERS[arch](in_shape[0])
    return features, _flat_dim(features, in_shape)  # also materialises lazy layers


def build_native(arch: str, in_shape: tuple[int, int, int], num_classes: int,
                 hidden: int | None = None) -> NativeNet:
    """A native softmax classifier of the given architecture (returns logits).

    ``hidden`` adds one ReLU layer of that width before the logits: the certified softmax
    baseline (``train-native --certified``) is then the Distance NN's own network -- backbone,
    the Embedding module's hidden layer -- with a C-way logit layer where DunDi has its
    embedding layer and oracle database, so the two compare on equal terms."""
    features, dim = _features(arch, in_shape)
    if hidden is not None:
        features, dim = nn.Sequential(features, nn.Linear(dim, hidden), nn.ReLU()), hidden
    return NativeNet(features, dim, num_classes)


# Hidden width of the Embedding module per backbone (default 256): the certified backbone's
# 3,136 features feed a wider layer, which measured better certified accuracy.
EMBED_HIDDEN = {"cnn-ibp": 512, "cnn-ibp-medium": 512, "cnn7": 512}


class EmbeddingModule(nn.Module):
    """The paper's Embedding module: two fully connected layers → a 128-d embedding."""

    def __init__(self, in_dim: int, embed_dim: int = EMBED_DIM, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DistanceNet(nn.Module):
    """The Distance NN: DNN module (``backbone``) + Embedding module. Returns f(x)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, embed_dim: int = EMBED_DIM,
                 frozen_backbone: bool = False, hidden: int = 256, prototypes: int = 0):
        super().__init__()
        self.backbone = backbone
        self.embedding = EmbeddingModule(feature_dim, embed_dim, hidden)
        self.embed_dim = embed_dim
        self.frozen_backbone = frozen_backbone
        if frozen_backbone:
            self.backbone.requires_grad_(False)
        if prototypes:  # certified training's learned class prototypes (--cert-head prototypes)
            self.prototypes = nn.Parameter(0.1 * torch.randn(prototypes, embed_dim))
            self.spread = nn.Parameter(torch.zeros(prototypes))

    def prototype_head(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The linear head (C, D) weights 2p_c and (C,) biases −(‖p_c‖² + s_c) that learned
        prototypes stand for, or None. A class's n oracles score 2z·μ_c − ν̄_c, with
        ν̄_c = ‖μ_c‖² + their spread (≥ 0, hence the softplus): the head any oracle set with
        mean p_c and that spread realises, which index building herds toward."""
        if not hasattr(self, "prototypes"):
            return None
        p = self.prototypes
        return 2 * p, -((p * p).sum(1) + nn.functional.softplus(self.spread))

    def train(self, mode: bool = True) -> "DistanceNet":
        super().train(mode)
        if self.frozen_backbone:  # a frozen backbone keeps its batch-norm statistics
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor] | None = None):
        """f(x); with ``box`` (lower, upper input bounds) also interval bounds on the
        activations entering the last layer, for certified training. Computing both inside
        ``forward`` keeps a DistributedDataParallel wrapper in charge of the gradients."""
        emb = self.embedding(self.backbone(x))
        if box is None:
            return emb
        h_lo, h_hi = propagate(split_last_linear(self)[0], *box)
        return emb, h_lo, h_hi


# what interval bounds may flatten, matched by exact type (dundi.nets.bounds.layers_of)
COMPOSITES[NativeNet] = lambda net: [net.features, net.head]
COMPOSITES[EmbeddingModule] = lambda net: [net.net]
COMPOSITES[DistanceNet] = lambda net: [net.backbone, net.embedding]


def build_distance_net(arch: str, in_shape: tuple[int, int, int], embed_dim: int = EMBED_DIM,
                       pretrained: NativeNet | None = None, prototypes: int = 0) -> DistanceNet:
    """DunDi_R (``pretrained=None``: fresh backbone, all trained) or DunDi_P (frozen copy);
    ``prototypes`` classes of learned prototypes for certified training's prototype head."""
    if pretrained is None:
        features, dim = _features(arch, in_shape)
        return DistanceNet(features, dim, embed_dim, hidden=EMBED_HIDDEN.get(arch, 256), prototypes=prototypes)
    return DistanceNet(copy.deepcopy(pretrained.features), pretrained.feature_dim, embed_dim,
                       frozen_backbone=True)
