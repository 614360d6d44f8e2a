"""The cnn-ibp-medium backbone: its interval bounds are sound."""

from __future__ import annotations

import torch

from dundi.nets.bounds import input_box
from dundi.nets.models import build_distance_net


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
