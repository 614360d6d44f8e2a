"""The adversarial evaluation fanned out over Ray: one task per shard (attack × eps × threat
model × slice of samples), one CPU each.

The driver plans the shards (:func:`dundi.evaluate.prepare`), skips the finished ones, puts
the two runs' files and the evaluated samples into the object store once, and keeps
``workers`` tasks running and as many queued (so no worker waits for the driver's round
trip). Each task rebuilds the runs from those bytes in a per-process temporary directory
(so workers need no shared filesystem; a worker process keeps its
:class:`~dundi.evaluate.Evaluator` for the next shard), evaluates its shard and returns the
Arrow table; the driver writes it atomically the moment it arrives. A killed evaluation
loses only the shards in flight: rerunning the same command skips every written shard.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import ray

from dundi.artifacts import RUN_FILE, read_meta
from dundi.evaluate import EvalConfig, Evaluator, ShardSpec, _progress, prepare
from dundi.results import write_shard

# A local Ray started for an evaluation runs its workers at the driver's own priority. Ray's
# default (worker_niceness 15) makes the shards, all the real work, yield to every other
# process: on a shared 2-core machine that made 2 workers 4x slower than one plain process
# (bench/evaluate_fanout.py). Ray Jobs use 0 for the same reason.
LOCAL_RAY_CONFIG = {"worker_niceness": 0}

# Per worker process: (fingerprint, split, limit) → Evaluator (Ray reuses worker processes
# between tasks). The fingerprint leaves out the sample count, which decides the Evaluator's
# sample list: two evaluations of one run with other --limit must not share one.
_EVALUATORS: dict[tuple, Evaluator] = {}


def run_files(run_dir: str | os.PathLike) -> dict[str, bytes]:
    """run.json and every file it records (weights, oracle index), as bytes."""
    run_dir = Path(run_dir)
    names = [RUN_FILE, *read_meta(run_dir).get("files", {})]
    return {name: (run_dir / name).read_bytes() for name in names}


def _materialize(files: dict[str, bytes], root: Path) -> str:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(root)


def evaluator_key(cfg_dict: dict, fingerprint: str) -> tuple:
    """What an Evaluator's state depends on: the evaluation and its sample list."""
    return fingerprint, cfg_dict.get("split"), cfg_dict.get("limit")


def _evaluator(cfg_dict: dict, fingerprint: str, bundle: dict) -> Evaluator:
    key = evaluator_key(cfg_dict, fingerprint)
    if key not in _EVALUATORS:
        cfg = EvalConfig(**cfg_dict)
        root = Path(tempfile.mkdtemp(prefix=f"dundi-eval-{fingerprint}-"))
        run_dir = _materialize(bundle["dundi"], root / "dundi")
        native_dir = _materialize(bundle["native"], root / "native") if bundle["native"] else None
        _EVALUATORS[key] = Evaluator(cfg, run_dir, native_dir, data=bundle["data"])
    return _EVALUATORS[key]


@ray.remote(num_cpus=1, max_retries=1)
def evaluate_shard_task(cfg_dict: dict, fingerprint: str, bundle: dict, spec: dict):
    """Evaluate one shard on a Ray worker; returns (shard name, Arrow table, seconds)."""
    import torch

    torch.set_num_threads(1)  # one CPU per task: the tasks are the parallelism
    t0 = time.perf_counter()
    spec_obj = ShardSpec(**spec)
    table = _evaluator(cfg_dict, fingerprint, bundle).evaluate_shard(spec_obj)
    return spec_obj.name, table, time.perf_counter() - t0


def evaluate_on_ray(cfg: EvalConfig, out: str | os.PathLike, workers: int | None = None,
                    address: str | None = None, progress: bool = True, max_shards: int | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the unfinished shards of an evaluation as Ray tasks; returns timing figures.

    ``workers``: tasks in flight at once (default: the cluster's CPUs). Without ``address``
    a local Ray with ``workers`` CPUs is started (and stopped again at the end)."""
    from dundi.distributed.ray_init import init_ray

    evaluation, plan, todo = prepare(cfg, out)
    skipped = len(plan) - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    log(f"evaluation {evaluation['fingerprint']}: {len(plan)} shards, {skipped} already finished, "
        f"{len(todo)} to run on Ray")
    figures = {"shards_run": len(todo), "shards_skipped": skipped, "mode": "ray"}
    if not todo:
        return {**figures, "seconds": 0.0, "workers": 0}
    started = not ray.is_initialized()
    local = address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
    resources = init_ray(address, num_cpus=workers if address is None else None,
                         **({"_system_config": LOCAL_RAY_CONFIG} if local else {}))
    in_flight = max(1, int(workers or resources.get("CPU", 1)))
    # Two tasks per worker slot: the next shard already waits at the raylet when one finishes,
    # so a worker never idles for the driver's round trip (ray.wait → write → submit).
    depth = 2 * in_flight
    t0 = time.perf_counter()
    try:
        data = Evaluator.load_samples(cfg, evaluation["dataset"])
        bundle = ray.put({"dundi": run_files(cfg.run), "native": run_files(cfg.native) if cfg.native else None,
                          "data": data})
        cfg_dict = dataclasses.asdict(cfg)
        queue = list(todo)
        pending: list = []
        bar = _progress(len(todo), progress)
        task_seconds = 0.0
        while queue or pending:
            while queue and len(pending) < depth:
                spec = queue.pop(0)
                pending.append(evaluate_shard_task.remote(cfg_dict, evaluation["fingerprint"], bundle,
                                                          dataclasses.asdict(spec)))
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                name, table, seconds = ray.get(ref)
                spec = evaluation["shards"][name]
                write_shard(out, name, table, evaluation["fingerprint"], rows=spec["stop"] - spec["start"])
                task_seconds += seconds
                bar.update(1)
        bar.close()
    finally:
        if started and address is None:
            ray.shutdown()
    wall = time.perf_counter() - t0
    return {**figures, "seconds": round(wall, 3), "task_seconds": round(task_seconds, 3),
            "workers": in_flight}


__all__ = ["evaluate_on_ray", "evaluate_shard_task", "run_files", "LOCAL_RAY_CONFIG"]
