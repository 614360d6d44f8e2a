"""The softmax IBP baseline's certificates beside its own white-box AutoAttack rows.

Why: `dundi evaluate` checks certified DunDi's proofs against every attack row of the main run;
the baseline is attacked as the evaluation's native model (the `transfer` rows' native
columns: AutoAttack on its own logits), so its proofs are checked here, the same way: no
attack may flip a sample certified at a budget at least the attack's, and certified <=
robust <= clean. Prints one JSON object (the raw file beside the page); exits 1 on a flip.

    python docs/results/certified/equal-terms/native_soundness.py EVAL_DIR > native-soundness-EPS.json
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from dundi.evaluation.config import EvalConfig
from dundi.evaluation.shard import Evaluator
from dundi.evaluation.results import read_evaluation, read_results
from dundi.run.directory import Run


def check(out: str) -> dict:
    evaluation = read_evaluation(out)
    cfg = EvalConfig(**evaluation["config"])
    images, labels, ids = Evaluator.load_samples(cfg, evaluation["dataset"])
    rows = read_results(out).to_pandas()
    rows = rows[rows.threat == "transfer"]
    certifier = Run.load(cfg.native, with_oracle=False).certifier()
    result = {"native_run": cfg.native.split("/")[-1], "count": int(len(ids)), "eps": {}}
    position = {int(s): i for i, s in enumerate(ids)}
    clean = Run.load(cfg.native, with_oracle=False).classify(images).labels == labels
    flips = 0
    for eps in sorted(rows.eps.unique()):
        at = rows[rows.eps == eps]
        proven = certifier.batched(images, labels, eps=[float(eps)])["certified"][:, 0]
        robust = clean.copy()
        for sid, native_adv, label in zip(at.sample_id, at.native_adv, at.label):
            robust[position[int(sid)]] &= int(native_adv) == int(label)
        flipped = int((proven & ~robust).sum())
        flips += flipped
        result["eps"][f"{eps:g}"] = {"clean": float(clean.mean()), "robust": float(robust.mean()),
                                     "certified": float(proven.mean()), "certified_flipped": flipped}
    result["sound"] = flips == 0
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    found = check(sys.argv[1])
    print(json.dumps(found, indent=1, sort_keys=True))
    sys.exit(0 if found["sound"] and all(
        e["certified"] <= e["robust"] <= e["clean"] for e in found["eps"].values()) else 1)
