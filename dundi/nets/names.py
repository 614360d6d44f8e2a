"""The backbones' names, importable without torch: `dundi train --model` lists them before any
network is built (dundi.nets.models builds them)."""

from __future__ import annotations

ARCHITECTURES: tuple[str, ...] = ("lenet1", "lenet4", "lenet5", "cnn-ibp", "cnn-ibp-medium", "cnn7", "vgg16",
                                  "feinman-cnn")

# Backbones certified training accepts: no batch norm, whose training-mode statistics
# depend on the batch and so have no fixed interval rule while training (vgg16 has it).
CERTIFIABLE: tuple[str, ...] = ("cnn-ibp", "cnn-ibp-medium", "cnn7", "lenet1", "lenet4", "lenet5")
