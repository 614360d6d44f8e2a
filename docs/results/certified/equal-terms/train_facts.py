"""Print a run's training facts as JSON: the raw file behind a table's "training seconds".

Why: run.json holds them beside machine-specific fields (the host, file hashes); the page's
tables are rendered from these few fields only (dundi/evaluation/figures/page_equal_terms.py).

    python docs/results/certified/equal-terms/train_facts.py RUN_DIR > NAME-train.json
"""

from __future__ import annotations

import json
import sys

from dundi.run.storage import read_meta

FIELDS = ("kind", "arch", "dataset", "num_classes", "hidden", "embed_dim")
CONFIG = ("epochs", "lr", "seed", "certified", "cert_eps", "cert_mix", "cert_warmup", "cert_ramp",
          "cert_per_class", "cert_head", "metric", "val_fraction")


def facts(run_dir: str) -> dict:
    meta = read_meta(run_dir)
    env = {k: v for k, v in meta.get("environment", {}).items() if k != "host"}
    return {**{k: meta[k] for k in FIELDS if k in meta},
            "config": {k: meta["config"][k] for k in CONFIG if k in meta["config"]},
            "train_seconds": meta["metrics"]["train_seconds"], "environment": env}


if __name__ == "__main__":
    print(json.dumps(facts(sys.argv[1]), indent=1, sort_keys=True))
