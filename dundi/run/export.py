"""DunDi as a plain ``torch.nn.Module`` any outside tool can attack (``Run.as_module``,
``dundi export RUN --out FILE``).

The module maps images (N, C, H, W) in [0, 1] to (N, classes) scores and is written as
TorchScript (``torch.jit.save``), so loading it needs only torch::

    model = torch.jit.load("dundi.pt")                    # no dundi, no FAISS
    extra = {"dundi.json": ""}; torch.jit.load("dundi.pt", _extra_files=extra)  # its metadata

What it computes, for the run's resolved rule (n, m, k; every class holding at least n oracles):

* the embedding z, through the network's layers with every Linear layer as a 1×1 convolution
  (:mod:`dundi.nets.invariant`), in chunks of 8 rows -- for a run ranking by squared Euclidean
  distance the very bits :meth:`Run.embed <dundi.run.directory.Run.embed>` serves;
* the **label**, Algorithm 1 decided in float64: under the squared Euclidean distance exactly
  :class:`dundi.rule.exact.ExactRule` (u_c = ν_c − 2 z·σ_c summed in the same fixed pairwise
  order, step 1 the k smallest coarse sums with ties to the lower class, step 2 the first
  smallest fine sum in step-1 order); under the Euclidean distance the literal sums of float64
  distances (the paper's rule; the index's FAISS float32 answer agrees except within float32
  rounding of a tie);
* the **scores**: the adaptive stand-in's differentiable fine scores (−summed distance to each
  class's n oracles, divided by n, :class:`dundi.rule.reference.TwoStepScorer`), offset by
  detached constants so that the float64 label is the one strict maximum: classes step 1 drops
  sit below every kept class, kept classes at or above the label just below it. So
  ``argmax(module(x))`` is the rule's label for every input, ties included, and gradients are
  the stand-in's.
"""

import json
import os
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np
import torch
from torch import nn

from dundi.errors import DundiError
from dundi.nets.bounds import layers_of
from dundi.rule.exact import INVARIANT_ROWS, ClassSums
from dundi.rule.params import ResolvedRule, TwoStepRule

EXPORT_FORMAT = 1
META_NAME = "dundi.json"


class LinearAsConv(nn.Module):
    """A Linear layer computed as a 1×1 convolution (dundi.rule.exact.invariant_linear)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone()[:, :, None, None], requires_grad=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(linear.out_features)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x[:, :, None, None], self.weight, self.bias)[:, :, 0, 0]


def _fixed_sum(p: torch.Tensor) -> torch.Tensor:
    """:func:`dundi.rule.exact.fixed_sum` in torch: the same pairwise order, the same bits."""
    while p.shape[-1] > 1:
        if p.shape[-1] % 2 == 1:
            p = torch.cat([p, torch.zeros_like(p[..., :1])], dim=-1)
        p = p[..., 0::2] + p[..., 1::2]
    return p[..., 0]


class DunDiModule(nn.Module):
    """Images (N, C, H, W) → (N, classes) scores whose argmax is Algorithm 1's label (see the
    module docstring). Buffers: the oracles (C, n, D) float32 and, for the squared Euclidean
    rule, σ and ν of the coarse (first m) and fine (n) oracles in float64."""

    def __init__(self, layers: list[nn.Module], oracles: np.ndarray, rule: ResolvedRule):
        super().__init__()
        self.net = nn.Sequential(*[LinearAsConv(l) if isinstance(l, nn.Linear) else l for l in layers])
        for p in self.net.parameters():
            p.requires_grad_(False)
        n, m, k = rule.n, rule.m, rule.k
        o = np.ascontiguousarray(oracles[:, :n], dtype=np.float32)
        self.register_buffer("oracles", torch.from_numpy(o.copy()))
        self.register_buffer("oracles64", torch.from_numpy(o.astype(np.float64)))
        coarse, fine = ClassSums.of(o, m), ClassSums.of(o, n)
        self.register_buffer("sigma_coarse", torch.from_numpy(coarse.sigma.copy()))
        self.register_buffer("nu_coarse", torch.from_numpy(coarse.nu.copy()))
        self.register_buffer("sigma_fine", torch.from_numpy(fine.sigma.copy()))
        self.register_buffer("nu_fine", torch.from_numpy(fine.nu.copy()))
        self.n, self.m, self.k = int(n), int(m), int(k)
        self.squared = rule.distance.squared  # TorchScript reads a flag, not the Distance
        self.chunk = INVARIANT_ROWS

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        parts: List[torch.Tensor] = []
        for i in range(0, x.shape[0], self.chunk):
            h = x[i:i + self.chunk]
            single = h.shape[0] == 1
            if single:
                h = torch.cat([h, h])
            h = self.net(h)
            parts.append(h[:1] if single else h)
        if len(parts) == 0:
            return torch.zeros(0, self.oracles.shape[2], dtype=x.dtype, device=x.device)
        return torch.cat(parts)

    def decide(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1 from embeddings in float64: (B, k) classes step 1 keeps, best first, and
        the (B,) labels (see the module docstring)."""
        z64 = z.detach().to(torch.float64)
        if self.squared:
            coarse = self.nu_coarse[None, :] - 2.0 * _fixed_sum(z64[:, None, :] * self.sigma_coarse[None])
            fine = self.nu_fine[None, :] - 2.0 * _fixed_sum(z64[:, None, :] * self.sigma_fine[None])
        else:
            diff = z64[:, None, None, :] - self.oracles64[None]
            dist = torch.sqrt((diff * diff).sum(-1))
            coarse, fine = dist[:, :, :self.m].sum(-1), dist.sum(-1)
        top = torch.sort(coarse, dim=1, stable=True).indices[:, :self.k]   # smallest first, ties low
        best = fine.gather(1, top).argmin(1)                                  # the first minimum
        return top, top.gather(1, best[:, None]).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x)
        c, n, d = self.oracles.shape[0], self.oracles.shape[1], self.oracles.shape[2]
        flat = self.oracles.reshape(c * n, d)
        d2 = (z * z).sum(1, keepdim=True) + (flat * flat).sum(1)[None, :] - 2.0 * (z @ flat.T)
        d2 = d2.clamp_min(0.0).reshape(z.shape[0], c, n)
        dist = d2 if self.squared else torch.sqrt(d2 + 1e-12)
        fine = -dist.sum(-1) / float(self.n)
        top, label = self.decide(z)
        with torch.no_grad():  # detached offsets: they decide the order, not the gradient
            kept = torch.zeros_like(fine, dtype=torch.bool).scatter_(1, top, True)
            inf = torch.full_like(fine, float("inf"))
            floor = torch.where(kept, fine, inf).amin(1, keepdim=True)
            best = fine.gather(1, label[:, None])
            tiny = 16 * 1.1920928955078125e-07 * (best.abs() + 1)  # 16 float32 ulps of 1
            gap = 1e-3 * (floor.abs() + 1)
            dropped_max = torch.where(kept, -inf, fine).amax(1, keepdim=True)
            drop = (dropped_max - floor).clamp(min=0).nan_to_num(0.0) + gap + tiny
            is_label = torch.zeros_like(kept).scatter_(1, label[:, None], True)
            above = kept & ~is_label & (fine >= best)
            offset = torch.where(kept, torch.where(above, fine - best + tiny, torch.zeros_like(fine)), drop)
        return fine - offset


def build_module(run, rule: TwoStepRule | ResolvedRule | None = None) -> DunDiModule:
    """The :class:`DunDiModule` of a loaded DunDi run under ``rule`` (a request is resolved on
    its index, once)."""
    if run.oracle is None:
        raise DundiError(f"{run.path} has no oracle index: build one with `dundi index build {run.path}` "
                         f"before exporting (a native run exports as its own model)")
    rule = run.oracle.resolve(rule)
    counts = run.oracle.class_counts()
    if counts.min() < rule.n:
        raise DundiError(f"{run.path}: exporting needs every class to hold at least n={rule.n} oracles; "
                         f"the index's classes hold {int(counts.min())} to {int(counts.max())} (use --n "
                         f"{int(counts.min())})")
    run.model.eval()
    oracles = run.oracle_tensor(rule.n).numpy()
    module = DunDiModule(layers_of(run.model), oracles, rule)
    return module.eval()


def export_metadata(run, rule: ResolvedRule) -> dict[str, Any]:
    """What the exported file says about itself: the rule, the classes, the input, the run's
    certificate settings where it was trained certified (no machine paths)."""
    meta, cfg = run.meta, run.meta.get("config", {})
    out = {"format": EXPORT_FORMAT, "kind": "dundi", "dataset": meta.get("dataset"), "arch": meta.get("arch"),
           "in_shape": list(meta["in_shape"]), "classes": list(run.class_names),
           "rule": rule.as_dict(),
           "input": "float32 pixels in [0, 1], (N, C, H, W)",
           "output": "(N, classes) scores; argmax = Algorithm 1's label",
           **run.file_hashes()}
    if cfg.get("certified"):
        out["certificate"] = {k: cfg.get(k) for k in ("cert_eps", "cert_warmup", "cert_ramp", "cert_per_class")
                              if k in cfg}
        out["certificate"].update(norm="Linf", metric=rule.metric)
        if "certificate" in meta:
            out["certificate"]["measured"] = meta["certificate"]
    return out


def export_run(run, out: str | os.PathLike, rule: TwoStepRule | None = None) -> dict[str, Any]:
    """Write the run as TorchScript to ``out`` (atomically); returns its metadata."""
    out = Path(out)
    if run.oracle is None:
        return build_module(run, rule)  # refuses in one line
    rule = run.oracle.resolve(rule)  # asked once, for the module and its metadata
    module = build_module(run, rule)
    meta = export_metadata(run, rule)
    if out.is_dir():
        raise DundiError(f"cannot write {out}: it is a directory; give a file name, e.g. {out / 'dundi.pt'}")
    if not out.parent.is_dir():
        raise DundiError(f"cannot write {out}: the directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise DundiError(f"cannot write {out}: permission denied; choose another --out")
    scripted = torch.jit.script(module)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        torch.jit.save(scripted, str(tmp), _extra_files={META_NAME: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DundiError(f"cannot write {out}: {exc.strerror or exc}; choose another --out") from None
    return meta


__all__ = ["DunDiModule", "build_module", "export_run", "export_metadata", "META_NAME"]
