"""Training on Ray Train: the core's loops under DDP on W workers, checkpointed and resumable.

``run_ray_training(kind, cfg, out, RayOptions(workers=W, ...))`` (the CLI's ``--workers W``)

- starts a local Ray, or joins the cluster at ``address`` (:func:`init_ray`);
- runs :func:`train_loop` on W Ray Train workers with DDP (gloo on CPU, NCCL on GPU). Each
  worker reads its own part of the training split's Parquet shards (whole shard files when
  there are at least W of them, else every W-th row), splits it into train/validation and
  draws its tuples from its own rows, seeded by (seed, rank). With one worker this is
  exactly the local loop (same rows, tuples, order and initial weights);
- averages the epoch's loss, fraction of tuples ordered correctly and two-step validation
  accuracy over the workers, reports them to Ray (``ray.train.report``) and checkpoints
  from rank 0 every epoch: weights, optimizer state, epoch, metric history and RNG state,
  as safetensors + JSON (nothing pickled), persisted by Ray into
  ``<storage>/<name>/epoch-NNNN`` only once complete;
- retries failed workers from the last checkpoint (``FailureConfig(max_failures)``); running
  again with the same name (default: the run directory's name) resumes from it, since Train
  V2 has no ``restore()`` and instead hands the last checkpoint of a run name to the workers;
- finally writes the run directory with the same calls as the local path
  (``artifacts.save_model``, ``metrics.json``, ``pipeline.build_index``), so nothing
  downstream can tell where a run was trained. The Ray-specific facts (workers, nodes,
  restarts) are kept under ``ray`` in ``run.json``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dundi.distributed import TRAIN_MAX_FAILURES
from dundi.errors import DundiError
from dundi.rule.params import ORACLES_PER_CLASS
from dundi.training.checkpoint import read_checkpoint, write_checkpoint
from dundi.training.config import TrainConfig
from dundi.training.loop import KINDS, resume_state

log = logging.getLogger(__name__)

RUN_DESCRIPTOR = "dundi_train.json"  # in <storage>/<name>/: what this run name trains
STORAGE_TIMEOUT_S = 30.0


@dataclasses.dataclass
class RayOptions:
    """How to run on Ray (the CLI's --workers --gpu --address --storage --name --max-failures)."""

    workers: int = 1
    gpu: bool = False
    address: str | None = None     # None: a local Ray (or the cluster of the Ray job we run in)
    storage: str | None = None     # local path or pyarrow URI; default <out>/../ray_storage
    name: str | None = None        # default: the run directory's name
    max_failures: int = TRAIN_MAX_FAILURES
    cpus_per_worker: float = 1.0
    data_dir: str | None = None
    oracles: int = ORACLES_PER_CLASS  # oracles per class in the final index (dundi runs)
    progress: bool = True          # rank 0 prints one line per epoch
    # Ray Train ``UserCallback``s, run on the controller after each report (every worker's
    # metrics and the persisted checkpoint): how a platform exports metrics or reacts to an epoch.
    callbacks: tuple = ()


# ----------------------------------------------------------------------------- storage


def resolve_storage(storage: str | None, out: Path) -> str:
    """The checkpoint storage as Ray wants it: an absolute local path or a filesystem URI.

    Without ``--storage`` checkpoints go next to the run directory (``<out>/../ray_storage``),
    not inside it, so the run directory holds exactly what a local run holds. A URI is
    checked with pyarrow (any scheme pyarrow supports: s3://, gs://, hdfs://, file://...).
    """
    if storage is None:
        path = (out.parent / "ray_storage").resolve()
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    if "://" not in storage:
        path = Path(storage).expanduser().resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DundiError(f"--storage {storage}: cannot create the directory ({exc.strerror})") from None
        return str(path)
    _filesystem(storage)  # raises DundiError if pyarrow cannot open it
    return storage


def _filesystem(uri: str):
    """(pyarrow filesystem, path) for a storage URI or path, with a timeout (s3 may hang)."""
    import pyarrow.fs as pafs

    def open_fs():
        return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(open_fs).result(timeout=STORAGE_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        raise DundiError(f"--storage {uri}: no answer within {STORAGE_TIMEOUT_S:.0f}s") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... with a useful message
        raise DundiError(f"--storage {uri} is not a filesystem pyarrow can open: {exc}") from None
    finally:
        pool.shutdown(wait=False)


def _run_name(name: str | None, out: Path) -> str:
    name = name or out.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", name):
        raise DundiError(f"--name {name!r}: use letters, digits and . _ = + - (it names a directory)")
    return name


def _check_descriptor(storage: str, name: str, descriptor: dict) -> dict | None:
    """Compare this run with what ``name`` trained before (if anything) and record it.

    Returns the previous descriptor when resuming. Raises when the name holds another
    experiment, instead of silently continuing someone else's checkpoints.
    """
    import pyarrow.fs as pafs

    fs, root = _filesystem(storage)
    run_dir = f"{root.rstrip('/')}/{name}"
    path = f"{run_dir}/{RUN_DESCRIPTOR}"
    previous = None
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as f:
                previous = json.loads(f.read().decode())
    except (OSError, ValueError) as exc:
        raise DundiError(f"cannot read {storage}/{name}/{RUN_DESCRIPTOR}: {exc}") from None
    if previous is not None:
        from dundi.training.loop import check_resume

        previous.setdefault("world_size", previous.get("workers"))  # descriptors before the rename
        check_resume(previous, descriptor, f"run name {name!r} in {storage}",
                     "pass another --name (or --out) to start a new one")
    try:
        fs.create_dir(run_dir, recursive=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps(descriptor, indent=2, sort_keys=True, default=str).encode())
        fs.move(tmp, path)
    except OSError as exc:
        raise DundiError(f"cannot write to --storage {storage}: {exc}") from None
    return previous


# ----------------------------------------------------------------------------- checkpoints


# ----------------------------------------------------------------------------- the worker


def worker_rows(dataset: str, data_dir: str | None, limit: int | None, rank: int,
                world: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This worker's part of the training split, read from the Parquet shards.

    With at least ``world`` shard files (and no ``limit``) a worker reads only its own files
    (``paths[rank::world]``). Otherwise it reads the first ``limit`` rows and keeps every
    ``world``-th (``rank::world``): row-striding keeps each worker's classes balanced even
    when the rows are stored sorted by class. One worker gets exactly ``load_split``'s rows.
    """
    from dundi.data import read_shards, shard_paths

    paths = shard_paths(dataset, "train", data_dir)
    if world > 1 and limit is None and len(paths) >= world:
        return read_shards(paths[rank::world])
    images, labels, ids = read_shards(paths, limit=limit)
    if world == 1:
        return images, labels, ids
    return images[rank::world], labels[rank::world], ids[rank::world]


def _allreduce(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: one DDP worker running the core's epoch loop
    (:func:`dundi.training.loop.train_epochs`) on its own rows; rank 0 checkpoints."""
    import ray.train
    import ray.train.torch

    from dundi.run.storage import build_from_meta
    from dundi.run.pipeline import training_rows
    from dundi.training.loop import TIMING_KEYS, Worker, train_epochs

    cfg = TrainConfig(**config["cfg"])
    kind = config["kind"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    worker = Worker(rank, world, device, sum=lambda values: _allreduce(values, device),
                    min=lambda value: _allreduce_min(value, device), wrap=ray.train.torch.prepare_model)
    say = _say if (rank == 0 and config.get("progress", True)) else (lambda line: None)

    # --- data: this worker's rows, split and validated exactly as local training does
    rows = training_rows(cfg, kind, *worker_rows(cfg.dataset, config.get("data_dir"), cfg.limit, rank, world))
    if (np.bincount(rows.labels[rows.tr], minlength=2) >= 2).sum() < 2:
        raise DundiError(f"worker {rank} of {world} got {len(rows.tr)} training samples with fewer than "
                         f"two classes of two samples each: use more data (--limit) or fewer workers")

    # --- model: the driver's seeded initial weights, or the last checkpoint's
    model = build_from_meta(config["model_meta"])
    model.load_state_dict(config["init_state"])
    resumed, starts = _resumed(ray.train.get_checkpoint())
    starts = [*starts, resumed.epoch + 1 if resumed else 0]
    nodes = _all_gather({"rank": rank, "node": ray.get_runtime_context().get_node_id(),
                         "host": os.uname().nodename, "pid": os.getpid(), "rows": int(len(rows.labels))})
    if resumed:
        say(f"[dundi] resuming {config['name']} from the checkpoint of epoch {resumed.epoch + 1}")
    say(f"[dundi] {kind} training on {world} worker(s): {[n['rows'] for n in nodes]} rows each, "
        f"epochs {starts[-1] + 1}..{cfg.epochs}")

    def report(epoch: int, metrics: dict, inner: torch.nn.Module, optimizer: torch.optim.Optimizer,
               state: dict) -> None:
        timing = {k: v for k, v in state["history"][-1].items() if k in TIMING_KEYS}
        say(f"[dundi] epoch {epoch + 1}/{cfg.epochs} " +
            " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch") +
            f" ({timing['seconds']:.1f}s)")
        figures = {**metrics, **timing, "world_size": world}
        if rank != 0:
            ray.train.report(figures, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="dundi-ckpt-") as tmp:
            write_checkpoint(Path(tmp), inner, optimizer, {**state, "starts": starts, "nodes": nodes})
            ray.train.report(figures, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch-{epoch:04d}")

    train_epochs(model, rows.images[rows.tr], rows.labels[rows.tr], cfg, kind, worker, validate=rows.validate,
                 val_count=len(rows.va), resumed=resumed, on_epoch=report, progress=False,
                 state=resume_state(kind, cfg, world, config.get("pretrained")))


def _resumed(checkpoint: Any) -> tuple[Any, list[int]]:
    """The worker's starting point from Ray Train's last checkpoint (None on a fresh run) and
    the epochs at which earlier attempts started."""
    from dundi.training.loop import Resumed

    if checkpoint is None:
        return None, []
    with checkpoint.as_directory() as d:
        state, weights, optimizer, rng = read_checkpoint(d)
    return (Resumed(state["epoch"], weights, optimizer, rng, state["history"], state.get("seconds", 0.0)),
            state.get("starts", []))


def _say(line: str) -> None:
    # Not print(): Ray Train patches print into its logger, which shows every line twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _allreduce_min(value: int, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


# ----------------------------------------------------------------------------- the driver


def _initial_model(kind: str, cfg: TrainConfig, pretrained: str | None):
    """The seeded initial model, built exactly as the local path builds it, and the
    metadata that rebuilds its architecture on the workers."""
    from dundi.run.pipeline import new_distance_net, new_native_net, run_meta

    if kind == "native":
        if pretrained:
            raise DundiError("--pretrained only applies to `dundi train`")
        return new_native_net(cfg), run_meta("native", cfg), {}
    model, mode = new_distance_net(cfg, pretrained)
    extra = {"embed_dim": cfg.embed_dim, **mode}
    return model, run_meta("dundi", cfg, **extra), extra


def _check_resources(opts: RayOptions, resources: dict) -> None:
    need_cpu = opts.workers * opts.cpus_per_worker
    have_cpu, have_gpu = resources.get("CPU", 0), resources.get("GPU", 0)
    where = f"the Ray cluster at {opts.address}" if opts.address else "the local Ray"
    if have_cpu < need_cpu:
        raise DundiError(f"{opts.workers} workers × {opts.cpus_per_worker:g} CPU need {need_cpu:g} "
                         f"CPUs but {where} has {have_cpu:g}: lower --workers or add nodes")
    if opts.gpu and have_gpu < opts.workers:
        raise DundiError(f"--gpu with {opts.workers} workers needs {opts.workers} GPUs but "
                         f"{where} has {have_gpu:g}")


def _ray_failure_message(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    dundi = [ln for ln in lines if "DundiError" in ln]
    return (dundi[-1].split("DundiError:", 1)[-1].strip() if dundi else
            " | ".join(lines[-3:]) if lines else type(exc).__name__)


def _check_options(kind: str, cfg: TrainConfig, opts: RayOptions) -> None:
    from dundi.data import DATASETS

    if kind not in KINDS:
        raise DundiError(f"unknown training kind {kind!r}: choose one of {', '.join(KINDS)}")
    if opts.workers < 1:
        raise DundiError(f"--workers must be at least 1, got {opts.workers}")
    if opts.max_failures < -1:
        raise DundiError(f"--max-failures must be -1 (retry forever) or more, got {opts.max_failures}")
    cfg.validate()
    if cfg.dataset not in DATASETS:
        raise DundiError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}")


def _trainer(loop_config: dict, opts: RayOptions, name: str, storage: str):
    """The TorchTrainer of one run: W workers (a GPU each with --gpu), checkpoints under
    ``storage/name`` (the last two kept), ``max_failures`` retries from the last one."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    per_worker = {"CPU": opts.cpus_per_worker, **({"GPU": 1} if opts.gpu else {})}
    return TorchTrainer(
        train_loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=opts.workers, use_gpu=opts.gpu,
                                               resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if opts.gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(opts.callbacks)))


def _fit(trainer: Any, name: str, storage: str, opts: RayOptions, epochs: int) -> tuple[dict, dict]:
    """Run the trainer; (the last checkpoint's state, its weights), or one clear DundiError."""
    import ray.train

    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise DundiError(f"Ray Train run {name!r} failed (after up to {opts.max_failures} retries): "
                         f"{_ray_failure_message(exc)}; fix the cause and rerun with the same name "
                         f"to resume from {storage}/{name}") from None
    if result.checkpoint is None:
        raise DundiError(f"Ray Train run {name!r} finished without a checkpoint in {storage}/{name}")
    with result.checkpoint.as_directory() as d:
        state, weights, _, _ = read_checkpoint(d)
    if state["epoch"] + 1 < epochs:
        raise DundiError(f"the last checkpoint of {name!r} is epoch {state['epoch'] + 1} of {epochs}")
    return state, weights


def _write_run(out: Path, kind: str, cfg: TrainConfig, state: dict, weights: dict, model_meta: dict,
               extra: dict, ray_facts: dict, opts: RayOptions, data_dir: str | None) -> dict:
    """The run directory, written with the same calls as the local path (save_model,
    metrics.json, build_index): nothing downstream can tell where a run was trained."""
    from dundi.files import atomic_write_json
    from dundi.run.storage import build_from_meta, read_meta, save_model
    from dundi.run.pipeline import METRICS_FILE, build_index, native_accuracy
    from dundi.training.loop import TIMING_KEYS

    final = build_from_meta(model_meta)
    final.load_state_dict(weights)
    final.eval()
    history = [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in state["history"]]
    atomic_write_json(out / METRICS_FILE, [{k: round(v, 6) if isinstance(v, float) else v
                                            for k, v in h.items()} for h in history])
    metrics: dict[str, Any] = {"train_seconds": round(state["seconds"], 2)}
    if kind == "native":
        from dundi.data import load_split

        test_x, test_y, _ = load_split(cfg.dataset, "test", data_dir)
        metrics.update(test_accuracy=native_accuracy(final, test_x, test_y), test_count=len(test_y))
    else:
        metrics["final"] = history[-1]
    meta = save_model(out, final, {**model_meta, **extra, "metrics": metrics, "ray": ray_facts})
    if kind == "dundi":
        build_index(out, n=opts.oracles, seed=cfg.seed, data_dir=data_dir)
        meta = read_meta(out)
    return meta


def run_ray_training(kind: str, cfg: TrainConfig, out: str | os.PathLike, opts: RayOptions,
                     pretrained: str | None = None, log_fn: Callable[[str], None] = print) -> dict:
    """Train on Ray Train and write the run directory ``out``; returns its run.json."""
    import ray

    from dundi.data import fetch
    from dundi.distributed.ray_init import check_reachable, init_ray, is_local_address

    _check_options(kind, cfg, opts)
    out = Path(out)
    if opts.address and not ray.is_initialized():
        check_reachable(opts.address)  # before anything is written
    data_dir = opts.data_dir or os.environ.get("DUNDI_DATA_DIR")
    fetch(cfg.dataset, data_dir)  # fail fast (DatasetUnavailable) before starting anything
    storage, name = resolve_storage(opts.storage, out), _run_name(opts.name, out)
    if opts.address and not is_local_address(opts.address) and "://" not in storage:
        log_fn(f"note: checkpoints go to {storage} on each node's local disk; a multi-machine "
               f"cluster needs shared storage there (NFS) or a URI (--storage s3://...)")
    model, model_meta, extra = _initial_model(kind, cfg, pretrained)
    previous = _check_descriptor(storage, name, resume_state(kind, cfg, opts.workers, pretrained))
    resources = init_ray(opts.address, num_cpus=max(os.cpu_count() or 1,
                                                    math.ceil(opts.workers * opts.cpus_per_worker)))
    _check_resources(opts, resources)
    log_fn(f"Ray Train: {opts.workers} worker(s) ({'NCCL/GPU' if opts.gpu else 'gloo/CPU'}), "
           f"run name {name!r}, checkpoints in {storage}/{name}"
           + (" — resuming from its last checkpoint" if previous else ""))
    loop_config = {"kind": kind, "cfg": dataclasses.asdict(cfg), "model_meta": model_meta,
                   "init_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                   "data_dir": data_dir, "name": name, "progress": opts.progress, "pretrained": pretrained}
    t0 = time.time()
    state, weights = _fit(_trainer(loop_config, opts, name, storage), name, storage, opts, cfg.epochs)
    ray_facts = {"workers": state["world_size"], "name": name, "storage": storage,
                 "starts": state["starts"], "nodes": state["nodes"], "gpu": opts.gpu,
                 "epoch_seconds": [h["seconds"] for h in state["history"]],
                 "wall_seconds": round(time.time() - t0, 2)}
    return _write_run(out, kind, cfg, state, weights, model_meta, extra, ray_facts, opts, data_dir)
