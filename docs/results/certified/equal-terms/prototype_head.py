"""Certified accuracy of a ``--cert-head prototypes`` run's own learned head, beside its herded
oracles, as JSON: how much of what the network learned the oracles can realise.

Why: the deployed rule scores class c by 2z·μ_c − ν̄_c, μ_c and ν̄_c the mean and mean squared
norm of n real training images' embeddings; the prototype head trains against free p_c and
‖p_c‖² + s_c instead. Both are linear heads on the embedding, so the same elided interval bound
(float64, the exact last layer, no float32 rounding allowance: a diagnostic, not a served
certificate) proves each; the difference is what realising the prototypes with real images
costs. Only the herded oracles are a classifier DunDi can serve (`dundi certify` gives its
served figures).

    python docs/results/certified/equal-terms/prototype_head.py RUN [--eps 0.1 0.3] > prototype-head.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from dundi.data import load_split
from dundi.nets.bounds import input_box, propagate, split_last_linear
from dundi.run.directory import Run
from dundi.training.certified import elided_margins


def certified_share(body, last, head: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor, eps: float, batch: int = 500) -> float:
    """Share of (x, y) whose every rival's worst-case margin over the L∞ box is below 0."""
    weight = head[0] @ last.weight.detach().double()                 # logits = weight·h + bias
    bias = head[0] @ last.bias.detach().double() + head[1]
    proven = 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        with torch.no_grad():
            lo, hi = (t.double() for t in propagate(body, *input_box(xb, eps)))
            margins = elided_margins(weight[None] - weight[yb][:, None], bias[None] - bias[yb][:, None], lo, hi)
        margins[torch.arange(len(yb)), yb] = -1.0
        proven += int((margins.amax(1) < 0).sum())
    return proven / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.3])
    args = ap.parse_args()
    run = Run.load(args.run)
    x, y, _ = load_split(run.meta["dataset"], "test")
    x, y = torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    body, last = split_last_linear(run.model)
    oracles = torch.from_numpy(np.asarray(run.oracle.blocks)).double()     # (C, n, D)
    heads = {"learned prototypes": tuple(t.detach().double() for t in run.model.prototype_head()),
             f"herded oracles (n={oracles.shape[1]})": (2 * oracles.mean(1), -(oracles * oracles).sum(-1).mean(1))}
    figures = {name: {f"{eps:g}": certified_share(body, last, head, x, y, eps) for eps in [0.0, *args.eps]}
               for name, head in heads.items()}
    print(json.dumps({"run": run.meta.get("name", args.run.rstrip("/").split("/")[-1]),
                      "dataset": run.meta["dataset"], "split": "test", "count": len(y),
                      "oracle_select": run.oracle.meta.get("select"), "bound": "interval, float64, elided last layer",
                      "certified_accuracy": figures}, indent=1))


if __name__ == "__main__":
    main()
