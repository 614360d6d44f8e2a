"""Adversarial evaluation of one DunDi run, shard by shard, without Ray.

An evaluation is a grid (attack × eps × threat model) over a seeded sample of a test split,
cut into shards of ``shard_size`` samples. Its settings are an
:class:`~dundi.evaluation.config.EvalConfig`; :mod:`dundi.evaluation.plan` turns them into one
:class:`~dundi.evaluation.plan.AttackPlan` per attack setting and the shards; an
:class:`~dundi.evaluation.shard.Evaluator` turns a shard into rows.

:func:`prepare` plans the shards and writes ``evaluation.json``; :func:`evaluate_local` runs
the unfinished shards in this process; ``dundi.distributed.evaluate_job`` runs them on Ray
worker actors. Both write each shard atomically, so a killed evaluation restarts where it
stopped. Along :func:`evaluate_local`'s path each run's run.json is read once to plan (and
once more where :meth:`dundi.run.directory.Run.load` verifies the files it loads), and the
split is read once: the plan hands its samples to the evaluator.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pyarrow as pa
import torch

from dundi.errors import DundiError
from dundi.evaluation.config import EvalConfig
from dundi.evaluation.plan import (
    FORMAT_VERSION,
    ShardSpec,
    budgets,
    fingerprint,
    model_info,
    plan_attacks,
    plan_shards,
    select_samples,
)
from dundi.evaluation.results import EVALUATION_FILE, finished_shards, read_evaluation, record_timing, write_shard
from dundi.evaluation.shard import Samples
from dundi.files import atomic_write_json
from dundi.run.storage import load_oracle, read_meta


class Prepared(NamedTuple):
    """What planning an evaluation read and decided: the evaluation record, this call's shards,
    those not finished yet, the DunDi run's run.json and the evaluated samples."""

    evaluation: dict
    plan: list[ShardSpec]
    todo: list[ShardSpec]
    meta: dict
    samples: Samples


def plan_evaluation(cfg: EvalConfig, out: str | os.PathLike) -> Prepared:
    """Plan the evaluation and write ``evaluation.json`` (see :func:`prepare`), keeping what
    was read on the way for the caller."""
    meta = read_meta(cfg.run)  # first: a missing run is the mistake to report, not a missing --native
    cfg.validate()
    out = Path(out)
    if meta.get("kind") != "dundi":
        raise DundiError(f"{cfg.run} is a {meta.get('kind')} run: `dundi evaluate` takes a DunDi run "
                         f"(pass the native run with --native)")
    dataset = meta["dataset"]
    load_oracle(cfg.run, meta).resolve(cfg.rule)  # fail here, not in a Ray worker, on a bad n / m / k
    native_meta = read_meta(cfg.native) if cfg.native else {}
    if cfg.native and native_meta.get("dataset") != dataset:
        raise DundiError(f"--native {cfg.native} was trained on {native_meta.get('dataset')}, "
                         f"the DunDi run on {dataset}")
    fp = fingerprint(cfg, meta, native_meta)
    old: dict = {}
    if (out / EVALUATION_FILE).exists():
        old = read_evaluation(out)
        if old.get("fingerprint") != fp:
            raise DundiError(f"{out} holds an evaluation with other weights or settings "
                             f"(fingerprint {old.get('fingerprint')} ≠ {fp}); use another --out")
    from dundi.data import load_split
    from dundi.run.pipeline import run_rows

    images, labels, ids = run_rows(meta, *load_split(dataset, cfg.split, cfg.data_dir))
    positions = select_samples(len(labels), cfg.limit, cfg.seed)
    attacks = plan_attacks(cfg, dataset)
    plan = plan_shards(cfg, len(positions), attacks)
    # The directory accumulates (threat, attack label, eps) settings: shards of settings this
    # call does not evaluate stay in the plan; a setting evaluated again is re-planned (a
    # changed --limit must not leave two shards covering one sample).
    settings = {(s.threat, s.attack_label, s.eps) for s in plan}
    kept = [ShardSpec(**old["shards"][name]) for name in old.get("plan", [])]
    kept = [s for s in kept if (s.threat, s.attack_label, s.eps) not in settings]
    full = kept + plan
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}  # not part of the rows
    evaluation = {
        "format_version": FORMAT_VERSION, "fingerprint": fp, "dataset": dataset, "split": cfg.split,
        "samples": int(len(positions)), "split_size": int(len(labels)),
        "config": config, "eps": budgets(attacks),
        "model": model_info(cfg.run, meta), "native": model_info(cfg.native, native_meta),
        "plan": [s.name for s in full], "shards": {s.name: dataclasses.asdict(s) for s in full},
    }
    atomic_write_json(out / EVALUATION_FILE, evaluation)
    done = finished_shards(out, fp)
    todo = [s for s in plan if s.name not in done]
    return Prepared(evaluation, plan, todo, meta, (images[positions], labels[positions], ids[positions]))


def prepare(cfg: EvalConfig, out: str | os.PathLike) -> tuple[dict, list[ShardSpec], list[ShardSpec]]:
    """Plan the evaluation, write ``evaluation.json`` and return (evaluation, plan, todo):
    ``plan`` is this call's shards, ``todo`` those of them not finished yet.

    Refuses an output directory holding an evaluation with another fingerprint (other
    weights or settings): its finished shards would not be comparable."""
    prepared = plan_evaluation(cfg, out)
    return prepared.evaluation, prepared.plan, prepared.todo


def evaluate_local(cfg: EvalConfig, out: str | os.PathLike, progress: bool = True,
                   max_shards: int | None = None, log: Callable[[str], None] = print,
                   threads: int | None = 1) -> dict[str, Any]:
    """Run the unfinished shards of an evaluation in this process (no Ray); returns timing.

    ``threads``: shards evaluated at once, each in a thread of this process computing with one
    torch thread (None: one per core). Not torch's intra-op threads: a row's gradients are the
    same bits in any batch only at one torch thread (dundi.nets.invariant), and the rows must
    not depend on the layout; torch's kernels release the GIL, so concurrent shards use the
    cores instead. torch's thread setting is restored afterwards. On a GPU
    (``cfg.device``) shards run one at a time: the GPU is the parallelism."""
    from dundi.evaluation.config import resolve_device
    from dundi.evaluation.shard import Evaluator

    evaluation, plan, todo, meta, samples = plan_evaluation(cfg, out)
    log(f"evaluation {evaluation['fingerprint']}: {len(plan)} shards, "
        f"{len(plan) - len(todo)} already finished, {len(todo)} to run (in this process)")
    skipped = len(plan) - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    on_gpu = resolve_device(cfg.device) != "cpu"
    threads = 1 if on_gpu else max(1, min(threads or os.cpu_count() or 1, len(todo) or 1))
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if todo:
            evaluator = Evaluator(cfg, data=samples, meta=meta)
            bar = progress_counter(sum(s.stop - s.start for s in todo), progress, evaluation)
            for spec, table in _concurrently(evaluator.evaluate_shard, todo, threads):
                write_shard(out, spec.name, table, evaluation["fingerprint"], rows=spec.stop - spec.start)
                bar.update(spec.stop - spec.start)
            bar.close()
    finally:
        torch.set_num_threads(before)
    timing = {"shards_run": len(todo), "shards_skipped": skipped, "rows": sum(s.stop - s.start for s in todo),
              "seconds": round(time.perf_counter() - t0, 3), "workers": 1,
              "cores": threads, "threads": threads, "mode": "local"}
    if on_gpu:
        timing["device"] = resolve_device(cfg.device)
    if todo:
        record_timing(out, timing)
    return timing


def _concurrently(fn: Callable[[ShardSpec], pa.Table], specs: list[ShardSpec], threads: int):
    """(spec, fn(spec)) for every spec as each finishes, ``threads`` at a time; in order and in
    this thread when ``threads`` is 1. An error in one shard is raised once the running ones end
    (every finished shard has been yielded, so it is written)."""
    if threads <= 1:
        for spec in specs:
            yield spec, fn(spec)
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    queue = list(specs)
    with ThreadPoolExecutor(threads, thread_name_prefix="dundi-shard") as pool:
        running = {}
        for spec in queue[:threads]:
            running[pool.submit(fn, spec)] = spec
        queue = queue[threads:]
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                spec = running.pop(future)
                table = future.result()
                if queue:
                    nxt = queue.pop(0)
                    running[pool.submit(fn, nxt)] = nxt
                yield spec, table


def progress_counter(total: int, enabled: bool, evaluation: dict | None = None):
    """Progress in image-attacks (one sample under one attack setting: a row), with rate and
    ETA: a bar on a terminal, a line every few percent or minute in a job's log (dundi.progress)."""
    from dundi.progress import counter

    desc = f"evaluation {evaluation['fingerprint'][:8]}" if evaluation else "evaluation"
    return counter(total, desc, "image-attack", enabled)


__all__ = ["prepare", "plan_evaluation", "Prepared", "evaluate_local", "progress_counter"]
