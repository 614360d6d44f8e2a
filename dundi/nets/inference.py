"""Batched, gradient-free forward passes over arrays of images."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

EMBED_BATCH = 1024  # images per forward pass wherever a whole array is embedded or classified


@torch.no_grad()
def forward_batched(model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = EMBED_BATCH
                    ) -> np.ndarray:
    """``model`` applied in eval mode to (N, C, H, W) images; returns a float32 array."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # e.g. arrays from Ray's object store; torch wants writable
        x = torch.as_tensor(images, dtype=torch.float32)
        outs = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
        if not outs:
            return np.zeros((0, 0), np.float32)
        return torch.cat(outs).numpy()
    finally:
        model.train(was_training)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(labels)).mean()) if len(labels) else float("nan")
