"""The learning-rate step schedule (--lr-decay) and the cnn-ibp-medium backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dundi.bounds import input_box
from dundi.errors import DundiError
from dundi.models import build_distance_net, build_native
from dundi.train import TrainConfig, lr_at
from dundi.training_loop import train_epochs


def test_lr_at_divides_by_ten_per_decay_epoch_reached():
    cfg = TrainConfig(lr=1e-3, lr_decay=(5, 3))  # given in any order
    got = [lr_at(cfg, e) for e in range(7)]
    want = [1e-3] * 3 + [1e-4] * 2 + [1e-5] * 2
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert lr_at(TrainConfig(lr=2e-3), 100) == 2e-3  # no decay: constant


def test_lr_decay_must_name_a_later_epoch():
    with pytest.raises(DundiError, match="lr_decay epochs must be 1 or more"):
        TrainConfig(lr_decay=(0,)).validate()


def test_training_uses_the_decayed_rate_each_epoch():
    rng = np.random.default_rng(0)
    images = rng.random((60, 1, 28, 28), dtype=np.float32)
    labels = np.arange(60) % 10
    cfg = TrainConfig(dataset="mnist", arch="lenet1", epochs=3, lr=1e-3, lr_decay=(2,),
                      batch_size=20)
    seen: list[float] = []

    def hook(epoch, metrics, inner, optimizer, state):
        seen.append(optimizer.param_groups[0]["lr"])
    model = build_native("lenet1", (1, 28, 28), 10)
    train_epochs(model, images, labels, cfg, "native", on_epoch=hook, progress=False)
    np.testing.assert_allclose(seen, [1e-3, 1e-3, 1e-4], rtol=1e-12)


def test_cnn_ibp_medium_bounds_contain_sampled_embeddings():
    torch.manual_seed(0)
    net = build_distance_net("cnn-ibp-medium", (1, 28, 28)).double().eval()
    assert sum(p.numel() for p in net.backbone.parameters()) > 50_000  # the 4-conv backbone
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    _, h_lo, h_hi = net(x, box=input_box(x, 0.1))
    body = torch.nn.Sequential(net.backbone, *list(net.embedding.net)[:-1])
    lo, hi = input_box(x, 0.1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(20):
            pts = lo + torch.rand(x.shape, generator=g, dtype=x.dtype) * (hi - lo)
            h = body(pts)
            assert (h >= h_lo - 1e-9).all() and (h <= h_hi + 1e-9).all()
