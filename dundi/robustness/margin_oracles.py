"""Oracles chosen for certified margin instead of at random (``dundi index build --select margin``).

Why: under the squared Euclidean distance the two-step rule's fine step is a linear classifier
on the embedding z -- class c scores 2 z·μ_c − ν̄_c, μ_c the mean of its n oracles and ν̄_c
their mean squared norm (docs/certification.md) -- so *which* n training images are the
oracles decides the classifier's weights, and with them how far interval bounds can prove it.
Random oracles give noisy class means; a softmax network (the IBP baseline) trains its last
layer freely. This picks oracles that make the deployed rule robust, with the network fixed:

1. relax: class c's oracles become weights w_c (a softmax) over a pool of its training images,
   so μ_c = Σ w_cj z_j and ν̄_c = Σ w_cj ‖z_j‖² -- the rule with fractional oracles;
2. fit w by IBP's loss on training images (the mix of clean and worst-case cross-entropy over
   each image's L∞ box at ``eps``, the last layer elided): the network is fixed, so this is a
   small convex-in-(μ, ν̄) problem solved with Adam in seconds;
3. round: herding (Welling 2009; iCaRL's exemplar choice) picks n pool images one by one whose
   running mean of [z, ‖z‖²/s] comes closest to the fitted one.

Only training images are used; the certificate then proves whatever oracles were picked, as
it does random ones, so the choice cannot make a proof unsound -- only tighter or looser.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dundi.nets.bounds import input_box, propagate, split_last_linear
from dundi.nets.inference import forward_batched
from dundi.training.certified import elided_margins

POOL = 400        # candidate oracles per class
FIT_IMAGES = 3000  # training images whose boxes the weights are fitted on
FIT_STEPS = 300


def margin_oracles(model: nn.Module, images: np.ndarray, labels: np.ndarray, n: int,
                   num_classes: int, eps: float, seed: int, pool: int = POOL,
                   fit_images: int = FIT_IMAGES, steps: int = FIT_STEPS) -> np.ndarray:
    """Indices into ``images`` of n oracles per class, class-major (as OracleIndex.select):
    ``pool`` candidates per class, weights fitted on ``fit_images`` boxes in ``steps`` steps."""
    rng = np.random.default_rng([seed, 17])
    pools, emb = _pools(model, images, labels, n, num_classes, pool, rng)
    fit = rng.choice(len(labels), min(fit_images, len(labels)), replace=False)
    body, last = split_last_linear(model)
    with torch.no_grad():
        x = torch.from_numpy(images[fit]).float()
        h_lo, h_hi = (t.double() for t in propagate(body, *input_box(x, eps)))
        h = nn.Sequential(*body)(x).double()
    weight, bias = last.weight.detach().double(), last.bias.detach().double()
    y = torch.from_numpy(labels[fit]).long()
    mu, nu = _fit_weights(emb, h, h_lo, h_hi, y, weight, bias, steps)
    return np.concatenate([pools[c][_herd(emb[c], mu[c], nu[c], n)] for c in range(num_classes)]).astype(np.int64)


def prototype_oracles(model: nn.Module, images: np.ndarray, labels: np.ndarray, n: int,
                      num_classes: int, seed: int, pool: int = POOL) -> np.ndarray:
    """Indices of n oracles per class, class-major, herded toward the learned prototypes of a
    run trained with ``--cert-head prototypes``: their mean embedding and mean squared norm
    come as close as ``pool`` candidates allow to the p_c and ‖p_c‖² + s_c it was trained on."""
    weights, biases = (t.detach().double() for t in model.prototype_head())
    pools, emb = _pools(model, images, labels, n, num_classes, pool, np.random.default_rng([seed, 17]))
    return np.concatenate([pools[c][_herd(emb[c], weights[c] / 2, -biases[c], n)]
                           for c in range(num_classes)]).astype(np.int64)


def prototype_vectors(model: nn.Module, seed: int) -> np.ndarray:
    """(C·2, D) float32 oracle vectors, class-major, that realise a prototype run's learned head
    exactly: p_c ± r_c·u with ‖r_c·u‖² = s_c (u one seeded unit vector), whose mean is p_c and
    mean squared norm ‖p_c‖² + s_c. Not embeddings of samples: learned class representatives,
    ranked by the same two-step rule and proved by the same certificate."""
    weights, biases = (t.detach().double() for t in model.prototype_head())
    centre = weights / 2
    spread = (-biases - (centre * centre).sum(1)).clamp_min(0).sqrt()          # r_c
    u = torch.from_numpy(np.random.default_rng([seed, 23]).standard_normal(centre.shape[1]))
    u = u / u.norm()
    pairs = torch.stack([centre + spread[:, None] * u, centre - spread[:, None] * u], 1)   # (C, 2, D)
    return pairs.reshape(-1, centre.shape[1]).numpy().astype(np.float32)


def _pools(model: nn.Module, images: np.ndarray, labels: np.ndarray, n: int, num_classes: int,
           pool: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """Per class ``pool`` seeded candidate training images (at least n) and their embeddings."""
    pools = [rng.choice(np.flatnonzero(labels == c), max(n, min(pool, int((labels == c).sum()))),
                        replace=False) for c in range(num_classes)]
    model = model.eval()
    return pools, [torch.from_numpy(forward_batched(model, images[p])).double() for p in pools]


def _fit_weights(emb: list[torch.Tensor], h: torch.Tensor, h_lo: torch.Tensor, h_hi: torch.Tensor,
                 y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, steps: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fitted class means μ (C, D) and mean squared norms ν̄ (C,) of the relaxed oracles."""
    logits_w = torch.zeros(len(emb), max(len(e) for e in emb), dtype=torch.float64, requires_grad=True)
    pad = torch.stack([nn.functional.pad(e, (0, 0, 0, logits_w.shape[1] - len(e))) for e in emb])
    valid = torch.stack([torch.arange(logits_w.shape[1]) < len(e) for e in emb])
    norms = (pad * pad).sum(-1)
    opt = torch.optim.Adam([logits_w], lr=0.05)
    for _ in range(steps):
        w = torch.softmax(logits_w.masked_fill(~valid, -torch.inf), 1)          # (C, P)
        mu, nu = torch.einsum("cp,cpd->cd", w, pad), (w * norms).sum(1)
        head_w, head_b = 2 * mu @ weight, 2 * mu @ bias - nu                   # logits = head_w·h + head_b
        clean = h @ head_w.T + head_b
        g = head_w[None] - head_w[y][:, None]                                  # (B, C, H)
        worst = elided_margins(g, head_b[None] - head_b[y][:, None], h_lo, h_hi)
        loss = 0.5 * nn.functional.cross_entropy(clean, y) + 0.5 * nn.functional.cross_entropy(worst, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w = torch.softmax(logits_w.masked_fill(~valid, -torch.inf), 1)
        return torch.einsum("cp,cpd->cd", w, pad), (w * norms).sum(1)


def _herd(emb: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor, n: int) -> np.ndarray:
    """n distinct rows of ``emb`` chosen greedily so that the running mean of [z, ‖z‖²/s]
    stays closest to [μ, ν̄/s] (s: the pool's typical norm, so both parts weigh alike)."""
    scale = float(emb.norm(dim=1).mean()) or 1.0
    points = torch.cat([emb, (emb * emb).sum(1, keepdim=True) / scale], 1)
    target = torch.cat([mu, nu[None] / scale])
    chosen: list[int] = []
    total = torch.zeros_like(target)
    free = torch.ones(len(emb), dtype=torch.bool)
    for k in range(1, n + 1):
        gap = ((total[None] + points) / k - target).pow(2).sum(1).masked_fill(~free, torch.inf)
        j = int(gap.argmin())
        chosen.append(j)
        total += points[j]
        free[j] = False
    return np.array(chosen, dtype=np.int64)


__all__ = ["margin_oracles", "prototype_oracles", "prototype_vectors", "POOL", "FIT_IMAGES", "FIT_STEPS"]
