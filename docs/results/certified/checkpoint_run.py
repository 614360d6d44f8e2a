"""Turn the newest training checkpoint of an unfinished DunDi run into a run of its own.

Why: a long certified training on a shared machine may not end before its figures are due;
its per-epoch checkpoint holds the weights, so the run as it stands can be certified with the
product's own commands, and the training left to continue (it resumes from the same
checkpoint, untouched here). The snapshot records the checkpoint's epoch in ``run.json``.

    python docs/results/certified/checkpoint_run.py RUN_DIR SNAPSHOT_DIR
    dundi certify SNAPSHOT_DIR --eps 0.1 0.2 0.3 --json
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dundi.errors import DundiError
from dundi.rule.params import ORACLES_PER_CLASS
from dundi.run.storage import save_model
from dundi.run.pipeline import CHECKPOINT_DIR, build_index, new_distance_net, run_meta
from dundi.training.checkpoint import load_local
from dundi.training.config import TrainConfig, with_defaults


def snapshot(run_dir: Path, out: Path) -> dict:
    """Write the newest checkpoint of ``run_dir`` as a run in ``out``, with its oracle index."""
    saved = load_local(run_dir / CHECKPOINT_DIR)
    if saved is None:
        raise DundiError(f"{run_dir} has no training checkpoint ({CHECKPOINT_DIR}/)")
    state, weights, _, _ = saved
    if state["kind"] != "dundi":
        raise DundiError(f"{run_dir} is a {state['kind']} run; this snapshots DunDi runs")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in with_defaults(state["config"]).items() if k in fields})
    model, mode = new_distance_net(cfg, state.get("pretrained"))
    model.load_state_dict(weights)
    done = state["epoch"] + 1
    metrics = {"train_seconds": round(state.get("seconds", 0.0), 2), "epochs_done": done,
               "final": state["history"][-1]}
    meta = save_model(out, model, run_meta("dundi", cfg, embed_dim=cfg.embed_dim, metrics=metrics,
                                           checkpoint_of=str(run_dir), **mode))
    build_index(out, n=ORACLES_PER_CLASS, seed=cfg.seed)
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory holding .checkpoint/")
    parser.add_argument("out", type=Path, help="where to write the snapshot run")
    args = parser.parse_args()
    meta = snapshot(args.run, args.out)
    print(f"{args.out}: epoch {meta['metrics']['epochs_done']} of {meta['config']['epochs']}, "
          f"{meta['metrics']['train_seconds']:.0f} s of training")


if __name__ == "__main__":
    main()
