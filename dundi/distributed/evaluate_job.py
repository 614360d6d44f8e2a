"""The adversarial evaluation fanned out over Ray: long-lived worker actors, one CPU each,
that keep the runs loaded and take shards (attack × eps × threat model × slice of samples)
one after the other.

Ray and ``workers`` bare :class:`ShardWorker` actors start in a thread while the driver plans
the shards (:func:`dundi.evaluation.evaluate.plan_evaluation`) and loads the evaluated samples;
it skips the finished shards and puts the two runs' files and the samples into the object
store once. Each actor (with a GPU each when ``EvalConfig.device`` is cuda) rebuilds the runs from those bytes in a
temporary directory of its own (workers need no shared filesystem), builds its
:class:`~dundi.evaluation.shard.Evaluator` and warms it up once, then evaluates every shard the
driver hands it and returns the Arrow table with its own timestamps; the driver writes each
table atomically the moment it arrives. A killed evaluation loses only the shards in flight:
rerunning the same command skips every written shard. A worker that dies is restarted and
its shard retried (shards are seeded, so a retry gives the same rows).

Why actors rather than one task per shard (measured with py-spy and per-task CPU clocks, see
bench/evaluate_fanout.py): a warmed actor computes a shard in the same CPU time as the
driver's own process, but a fresh task process first spent about a quarter of its life
importing torch, pyarrow/pandas and dundi and rebuilding the evaluator, and tasks queued
behind a slow one left the other worker idle at the end. Actors pay the start-up once, in
parallel with each other, and the driver keeps each busy with one shard in flight (two while
the queue is long, so no actor waits for the driver's round trip).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ray

from dundi.errors import DundiError
from dundi.evaluation.config import EvalConfig
from dundi.evaluation.evaluate import plan_evaluation, prepare, progress_counter
from dundi.evaluation.plan import ShardSpec
from dundi.evaluation.shard import Evaluator
from dundi.evaluation.results import record_timing, write_shard
from dundi.run.storage import RUN_FILE, read_meta

# A local Ray started for an evaluation runs its workers at the driver's own priority. Ray's
# default (worker_niceness 15) makes the shards, all the real work, yield to every other
# process: on a shared 2-core machine that made 2 workers 4x slower than one plain process
# (bench/evaluate_fanout.py). Ray Jobs use 0 for the same reason.
LOCAL_RAY_CONFIG = {"worker_niceness": 0}


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


@ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)
class ShardWorker:
    """One worker process holding one :class:`~dundi.evaluation.shard.Evaluator` (model, oracle
    index, samples) for a whole evaluation.

    It is created bare (its process started and torch and dundi imported) while the driver
    still loads the runs and the samples, then loads them (:meth:`load`). Every shard call carries
    the bundle's reference too, so a worker that Ray restarted (a fresh process, bare again)
    loads before its first shard."""

    def __init__(self, cfg_dict: dict, threads: int = 1, niceness: int | None = None) -> None:
        import torch

        if niceness is not None:
            _set_niceness(niceness)
        torch.set_num_threads(threads)  # one CPU per worker: the workers are the parallelism
        self.cfg = EvalConfig(**cfg_dict)
        self.evaluator: Evaluator | None = None

    def load(self, bundle_ref: list) -> float:
        """Build and warm the evaluator from the bundle; returns the worker's clock once warm.
        The bundle comes as a nested reference: the driver holds it for the whole run, so a
        restarted actor can fetch it again."""
        if self.evaluator is None:
            bundle = ray.get(bundle_ref[0])
            root = Path(tempfile.mkdtemp(prefix="dundi-eval-"))
            run_dir = _materialize(bundle["dundi"], root / "dundi")
            native_dir = _materialize(bundle["native"], root / "native") if bundle["native"] else None
            self.evaluator = Evaluator(self.cfg, run_dir, native_dir, data=bundle["data"], meta=bundle["meta"])
            self.evaluator.warm_up()
        return time.time()

    def evaluate(self, spec: dict, bundle_ref: list) -> tuple[str, Any, dict]:
        """(shard name, Arrow table, the worker's own clock readings for this shard)."""
        self.load(bundle_ref)
        spec_obj = ShardSpec(**spec)
        start, cpu0 = time.time(), time.process_time()
        table = self.evaluator.evaluate_shard(spec_obj)
        return spec_obj.name, table, {"worker": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                                      "start": start, "end": time.time(), "rows": table.num_rows,
                                      "cpu_seconds": time.process_time() - cpu0,
                                      "niceness": os.getpriority(os.PRIO_PROCESS, 0)}


def _set_niceness(niceness: int) -> None:
    """Run this worker at the driver's priority. Ray starts workers at niceness 15 unless told
    otherwise (LOCAL_RAY_CONFIG does, for the local Ray it starts; a cluster or a Ray started by
    someone else may not), and at 15 the shards, all the real work, yield to every other
    process. Lowering niceness needs privilege: without it the worker keeps Ray's and reports
    it with every shard (``niceness`` in the timing)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except (PermissionError, OSError):
        pass


def check_worker_count(workers: int | None, resources: dict, started_here: bool) -> None:
    """Refuse, in one line, more one-CPU actors than the cluster has CPUs: the extra actors
    would wait for a CPU that never comes, and the evaluation would hang. A local Ray this call
    started has exactly ``workers`` CPUs (said above when that exceeds the cores)."""
    cpus = int(resources.get("CPU", 0))
    if workers and not started_here and workers > cpus:
        raise DundiError(f"--workers {workers} asks for {workers} one-CPU actors but the Ray cluster has "
                         f"{cpus} CPU(s): use --workers {max(cpus, 1)} or fewer, or add nodes")


def check_gpu_count(count: int, resources: dict) -> None:
    """Refuse, in one line, more one-GPU actors than the cluster has GPUs (they would wait
    for ever)."""
    gpus = int(resources.get("GPU", 0))
    if count > gpus:
        raise DundiError(f"--device cuda gives each Ray worker a GPU, but {count} worker(s) meet "
                         f"{gpus} GPU(s) in the Ray cluster: use --workers {max(gpus, 1)} or fewer"
                         + ("" if gpus else ", or --workers 0 (this process)"))


def _dispatch(actors: list, queue: list[ShardSpec], on_result: Callable[[str, Any, dict], None],
              *args: Any) -> None:
    """Keep every actor busy until the queue is empty: one shard in flight per actor, two while
    more than two shards per actor wait (so none idles for the round trip, and none holds a
    queued shard at the end while another actor has nothing to do). ``args`` go with every
    shard call (the bundle's reference, for a restarted actor to load from)."""
    queue = list(queue)
    inflight: dict = {}  # ref → actor index
    load = [0] * len(actors)
    while queue or inflight:
        for i, actor in enumerate(actors):
            depth = 2 if len(queue) > 2 * len(actors) else 1
            while queue and load[i] < depth:
                inflight[actor.evaluate.remote(dataclasses.asdict(queue.pop(0)), *args)] = i
                load[i] += 1
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for ref in ready:
            load[inflight.pop(ref)] -= 1
            on_result(*ray.get(ref))


def busy_overlap(tasks: list[dict]) -> float:
    """Seconds during which two or more workers were inside a shard, from the workers' own
    start and end stamps: how much of a run actually ran in parallel."""
    events = sorted([(t["start"], 1) for t in tasks] + [(t["end"], -1) for t in tasks])
    busy, last, total = 0, 0.0, 0.0
    for at, step in events:
        if busy >= 2:
            total += at - last
        busy, last = busy + step, at
    return total


class _Startup:
    """Ray and the bare actors, started while the driver plans the evaluation and loads the
    runs and samples in a thread (:func:`evaluate_on_ray`): both take seconds, and neither
    needs the other until the first shard goes out. Ray starts in the main thread: a local
    Ray started from another thread ends the driver process (exit status 1, no message) when
    the evaluation later runs, so the loading is what moves to a thread."""

    def __init__(self, cfg: EvalConfig, workers: int | None, address: str | None, local: bool,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.workers, self.address, self.local, self.log = cfg, workers, address, local, log
        self.resources: dict = {}
        self.actors: list = []
        self.error: BaseException | None = None

    def start(self) -> "_Startup":
        from dundi.distributed.ray_init import init_ray
        from dundi.evaluation.config import resolve_device

        try:
            workers = self.workers
            if self.local and workers and workers > (os.cpu_count() or 1):
                self.log(f"dundi: --workers {workers} on {os.cpu_count()} cores: the actors share the cores "
                         f"(no faster than --workers {os.cpu_count()})")
            self.resources = init_ray(self.address, num_cpus=workers if self.address is None else None,
                                      **({"_system_config": LOCAL_RAY_CONFIG} if self.local else {}))
            check_worker_count(workers, self.resources, self.local)
            count = max(1, int(workers or self.resources.get("CPU", 1)))
            gpus = 1 if resolve_device(self.cfg.device) != "cpu" else 0
            if gpus:
                check_gpu_count(count, self.resources)
            niceness = os.getpriority(os.PRIO_PROCESS, 0)
            self.actors = [ShardWorker.options(num_gpus=gpus).remote(dataclasses.asdict(self.cfg), niceness=niceness)
                           for _ in range(count)]
        except BaseException as exc:  # raised by result(), after a planning error if any
            self.error = exc
        return self

    def result(self, raise_error: bool = True) -> tuple[dict, list]:
        """The start-up's Ray resources and actors; its error is raised here (not when planning
        failed first: that mistake is the one to report)."""
        if self.error is not None and raise_error:
            raise self.error
        return self.resources, self.actors


class _PlanInThread(threading.Thread):
    """:func:`plan_evaluation` (the plan, the runs' files and the samples loaded) in a thread,
    its answer or its error kept for the driver."""

    def __init__(self, cfg: EvalConfig, out: str | os.PathLike) -> None:
        super().__init__(name="dundi-evaluation-plan", daemon=True)
        self.cfg, self.out = cfg, out
        self._value: tuple | None = None
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._value = plan_evaluation(self.cfg, self.out)
        except BaseException as exc:  # raised in the driver's thread by result()
            self._error = exc

    def result(self) -> tuple:
        if self._error is not None:
            raise self._error
        return self._value


def evaluate_on_ray(cfg: EvalConfig, out: str | os.PathLike, workers: int | None = None,
                    address: str | None = None, progress: bool = True, max_shards: int | None = None,
                    log: Callable[[str], None] = print, overlap_startup: bool = True) -> dict[str, Any]:
    """Run the unfinished shards of an evaluation on Ray worker actors; returns timing figures
    (``tasks``: each shard's worker, start and end on that worker's clock, CPU seconds).

    ``workers``: actors (default: the cluster's CPUs). Without ``address`` a local Ray with
    ``workers`` CPUs is started (and stopped again at the end). With ``cfg.device`` cuda each
    actor holds one GPU. ``overlap_startup`` (default): Ray and the bare actors start while
    the plan and the runs and samples load in a thread (False: one after the other, for
    bench/evaluate_fanout.py to compare); an evaluation with nothing left to run then paid
    for a Ray start it did not use."""
    started = not ray.is_initialized()
    local = address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
    t0, wall_start = time.perf_counter(), time.time()
    startup = _Startup(cfg, workers, address, local, log)
    tasks: list[dict] = []
    actors: list = []
    try:
        planned = _PlanInThread(cfg, out) if overlap_startup else None
        if planned is not None:
            startup.start()
            planned.join()
        try:
            evaluation, plan, todo, meta, samples = planned.result() if planned else plan_evaluation(cfg, out)
        except BaseException:
            actors = startup.result(raise_error=False)[1]  # no actor left behind
            raise
        if overlap_startup:
            actors = startup.result()[1]
        skipped = len(plan) - len(todo)
        if max_shards is not None:
            todo = todo[:max_shards]
        log(f"evaluation {evaluation['fingerprint']}: {len(plan)} shards, {skipped} already finished, "
            f"{len(todo)} to run on Ray")
        figures: dict[str, Any] = {"shards_run": len(todo), "shards_skipped": skipped, "mode": "ray"}
        if not todo:
            return {**figures, "seconds": 0.0, "workers": 0, "tasks": []}
        if not overlap_startup:
            actors = startup.start().result()[1]
        for actor in actors[len(todo):]:  # more actors than shards: the extra ones go
            ray.kill(actor, no_restart=True)
        actors = actors[:len(todo)]
        count = len(actors)
        bundle = [ray.put({"dundi": run_files(cfg.run), "native": run_files(cfg.native) if cfg.native else None,
                           "data": samples, "meta": meta})]
        bar = progress_counter(sum(s.stop - s.start for s in todo), progress, evaluation)

        def on_result(name: str, table: Any, info: dict) -> None:
            spec = evaluation["shards"][name]
            write_shard(out, name, table, evaluation["fingerprint"], rows=spec["stop"] - spec["start"])
            tasks.append({"shard": name, **info})
            bar.update(info["rows"])

        # All actors load at once; shards go out when every one is warm, so that no shard
        # waits behind a worker still starting while another worker runs out of work.
        ready = ray.get([actor.load.remote(bundle) for actor in actors])
        figures["ready_seconds"] = round(max(ready) - wall_start, 3)
        _dispatch(actors, todo, on_result, bundle)
        bar.close()
    finally:
        for actor in actors:  # free their CPUs on a Ray that outlives this call (a cluster)
            ray.kill(actor, no_restart=True)
        if started and address is None and ray.is_initialized():
            ray.shutdown()
    wall = time.perf_counter() - t0
    figures.update(rows=sum(t["rows"] for t in tasks), cores=count, node_count=len({t["node"] for t in tasks}))
    record_timing(out, {**figures, "seconds": round(wall, 3), "workers": count,
                        "cpu_seconds": sum(t["cpu_seconds"] for t in tasks)})
    return {**figures, "seconds": round(wall, 3), "workers": count,
            "task_seconds": round(sum(t["end"] - t["start"] for t in tasks), 3),
            "cpu_seconds": round(sum(t["cpu_seconds"] for t in tasks), 3),
            "parallel_seconds": round(busy_overlap(tasks), 3), "tasks": tasks}


# What Ray costs on one machine, measured by bench/evaluate_fanout.py on 2 cores: its first
# shard starts 5.4-7.8 s after the call (Ray and actors started, runs loaded), and its workers
# spend about 10% more CPU per shard than the one process (3.76 against 3.43 CPU-s).
RAY_STARTUP_S = 8.0
RAY_CPU_OVERHEAD = 1.10


def choose_layout(probe: dict[str, Any], cores: int, shards_left: int) -> tuple[str, str]:
    """("local" | "ray", why) from a measured first round of in-process shards: ``probe`` is
    :func:`~dundi.evaluation.evaluate.evaluate_local`'s timing with ``cpu_seconds`` (the
    process's CPU time) and ``seconds`` (wall). The rest is estimated both ways from the
    probe's CPU per shard: in this process at the cores its threads kept busy (the GIL can
    hold them back), or on one actor per core after Ray's start-up and overhead; the sooner
    wins, so short work never pays for a start-up it cannot earn back."""
    wall, cpu = probe.get("seconds") or 0.0, probe.get("cpu_seconds") or 0.0
    threads = max(1, min(cores, int(probe.get("threads") or 1)))
    used = min(cpu / wall, float(threads)) if wall > 0 and cpu > 0 else float(threads)
    rest_cpu = cpu / max(int(probe.get("shards_run") or 1), 1) * shards_left
    local_s, ray_s = rest_cpu / used, RAY_STARTUP_S + RAY_CPU_OVERHEAD * rest_cpu / cores
    figures = (f"{used:.2f} of {threads} cores busy in the first {probe.get('shards_run', 0)} shards; "
               f"the rest estimated at {local_s:.0f} s here, {ray_s:.0f} s on Ray")
    if cores <= 1 or local_s <= ray_s:
        return "local", f"in this process ({figures})"
    return "ray", f"on {cores} Ray actors ({figures})"


def evaluate_auto(cfg: EvalConfig, out: str | os.PathLike, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """One machine, no layout asked for: the first round of shards runs in this process, one
    shard per core at once; the measured use of the cores decides where the rest runs
    (:func:`choose_layout`). Both layouts give the same rows. On a GPU (``cfg.device``) the
    whole evaluation runs in this process, on the GPU."""
    from dundi.evaluation.config import resolve_device
    from dundi.evaluation.evaluate import evaluate_local

    device = resolve_device(cfg.device)
    if device != "cpu":
        timing = evaluate_local(cfg, out, progress=progress, log=log)
        return {**timing, "layout": "local", "layout_reason": f"in this process on {device}"}
    cores = os.cpu_count() or 1
    cpu0 = time.process_time()
    probe = evaluate_local(cfg, out, progress=False, max_shards=cores, log=log, threads=cores)
    probe["cpu_seconds"] = time.process_time() - cpu0
    _, plan, todo = prepare(cfg, out)
    layout, why = choose_layout(probe, cores, len(todo))
    log(f"dundi: evaluating {why}")
    if not todo:
        return {**probe, "layout": layout, "layout_reason": why}
    if layout == "ray":
        rest = evaluate_on_ray(cfg, out, workers=cores, progress=progress, log=log)
    else:
        rest = evaluate_local(cfg, out, progress=progress, log=log, threads=cores)
    return {**rest, "probe": probe, "layout": layout, "layout_reason": why,
            "seconds": round(probe["seconds"] + rest["seconds"], 3)}


__all__ = ["evaluate_on_ray", "evaluate_auto", "choose_layout", "RAY_STARTUP_S", "check_worker_count", "check_gpu_count", "ShardWorker", "busy_overlap", "run_files", "LOCAL_RAY_CONFIG"]
