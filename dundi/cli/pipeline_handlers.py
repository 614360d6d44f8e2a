"""The pipeline's commands, the handler half: train-native, train, index build/calibrate,
classify, certify, export, demo (their flags: dundi.cli.pipeline_cmds). Imported only when one
of them runs; Ray (dundi.distributed) is imported only by the branches that use it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dundi.cli.args import emit, rule_from_args, served_model_from_args
from dundi.cli.train_config import config_from_args, default_out
from dundi.errors import DundiError
from dundi.evaluation.table1 import run_demo
from dundi.run.directory import Run
from dundi.run.export import export_run
from dundi.run.image_files import read_images
from dundi.run.pipeline import (
    build_index,
    certify_split,
    classify_split,
    held_out_images,
    train_dundi_run,
    train_native_run,
)
from dundi.run.storage import index_version, read_meta
from dundi.serving import LoadedModel, ModelConfig
from dundi.serving.abstain import calibrate_rule, ensure_shape_basis, save_calibration
from dundi.serving.answers import classify_files, write_answers


def ray_options(args: argparse.Namespace):
    """The typed Ray options of `--workers W` runs: the edge takes these, never the namespace."""
    from dundi.distributed.train_job import RayOptions

    return RayOptions(workers=args.workers, gpu=args.gpu, address=args.address, storage=args.storage,
                      name=args.name, max_failures=args.max_failures, data_dir=args.data_dir,
                      oracles=getattr(args, "oracles", RayOptions.oracles), progress=not args.no_progress)


def cmd_train_native(args: argparse.Namespace) -> None:
    _train(args, "native")


def cmd_train(args: argparse.Namespace) -> None:
    _train(args, "dundi")


def _train(args: argparse.Namespace, kind: str) -> None:
    cfg = config_from_args(args)
    pretrained = getattr(args, "pretrained", None)
    label = "native" if kind == "native" else ("dundi-P" if pretrained else "dundi-R")
    out = Path(args.out) if args.out else default_out(cfg, label)
    if args.workers > 0:
        from dundi.distributed.train_job import run_ray_training

        meta = run_ray_training(kind, cfg, out, ray_options(args), pretrained=pretrained)
    elif kind == "native":
        meta = train_native_run(cfg, out, args.data_dir, progress=not args.no_progress, device=args.device)
    else:
        meta = train_dundi_run(cfg, out, pretrained, args.data_dir, progress=not args.no_progress,
                               device=args.device)
    figures = {"run": str(out), "kind": kind, "dataset": cfg.dataset, "model": cfg.arch, **meta.get("metrics", {})}
    if kind == "dundi":
        if index_version(meta) is None:
            build_index(out, n=args.oracles, seed=cfg.seed, data_dir=args.data_dir)
        result = classify_split(out, split="test", data_dir=args.data_dir)
        figures.update(mode=meta.get("mode"), test_accuracy=result["accuracy"], n=result["n"],
                       m=result["m"], k=result["k"])
    figures.pop("final", None)
    emit(figures, args.json, f"trained {out}")


def cmd_index_build(args: argparse.Namespace) -> None:
    index = build_index(args.run, n=args.oracles, seed=args.seed, data_dir=args.data_dir,
                        margin_eps=args.select_eps, oracle_kind=args.oracle_kind)
    emit({"run": args.run, "classes": index.num_classes, "n": index.n, "dim": index.dim,
          "seed": args.seed, "select": index.meta.get("select", "random")}, args.json,
         f"built oracle index in {args.run}")


def cmd_index_calibrate(args: argparse.Namespace) -> None:
    """Calibrate the abstain rule on held-out data and store it with the index metadata."""
    model = LoadedModel(ModelConfig(run=os.path.abspath(args.run), n=args.n, m=args.m, k=args.k))
    images, labels, source = held_out_images(model.run, args.data_dir, limit=args.limit)
    ensure_shape_basis(model, args.data_dir)
    cal = calibrate_rule(model, images, labels, rate=args.false_abstain)
    save_calibration(model.run.path, cal, source, model.info.index_sha256)
    figures = {"run": args.run, "source": source, **{k: v for k, v in cal.items() if k != "per_signal_rate"},
               **{f"rate_{k}": v for k, v in cal["per_signal_rate"].items()}}
    emit(figures, args.json, f"abstain rule stored in {args.run}/run.json (served by default)")


def _classify_files(args: argparse.Namespace) -> None:
    """`classify RUN IMAGES...`: one answer per image, as a table or jsonl/csv/parquet."""
    clash = [flag for flag, on in (("--split", args.split != "test"), ("--limit", args.limit is not None),
                                   ("--radius", args.radius), ("--json", args.json)) if on]
    if clash:
        raise DundiError(f"{', '.join(clash)} apply to a dataset split (classify RUN without IMAGES); "
                         f"with IMAGES use --format jsonl|csv|parquet (the certified radius is shown "
                         f"where the run has one)")
    if args.format == "parquet" and not args.out:
        raise DundiError("--format parquet writes a file: give --out FILE.parquet")
    meta = read_meta(args.run)
    images, files = read_images(args.images, meta["in_shape"], resize=args.resize)  # bad files: fail first
    if meta["kind"] == "native":
        if args.n is not None or args.m is not None:
            raise DundiError(f"{args.run} is a native run: it has no oracles, so --n and --m do not "
                             f"apply; omit them (it classifies by the argmax of its logits)")
        model = Run.load(args.run)
    else:
        _, model = served_model_from_args(args.run, args, loaded=Run.load(args.run))
    rows, info = classify_files(model, images, files, rule_from_args(args))
    text = write_answers(rows, info, args.format, args.out)
    if text is not None:
        print(text, end="")
    else:
        print(f"dundi: wrote {len(rows)} answers to {args.out}", file=sys.stderr)


def cmd_classify(args: argparse.Namespace) -> None:
    if args.images:
        return _classify_files(args)
    figures = classify_split(args.run, rule_from_args(args), split=args.split,
                             data_dir=args.data_dir, limit=args.limit, radii=args.radius)
    # a native run has no oracles: its accuracy is the argmax of its logits, and says so
    title = ("native classification (argmax of the logits)" if figures.get("kind") == "native"
             else "two-step classification")
    emit(figures, args.json, title)


def cmd_certify(args: argparse.Namespace) -> None:
    figures = certify_split(args.run, eps=args.eps, rule=rule_from_args(args), split=args.split,
                            data_dir=args.data_dir, limit=args.limit, verifier=args.verifier)
    emit(figures, args.json, f"certified accuracy of the two-step rule (L-inf, {args.verifier} bounds)")


def cmd_export(args: argparse.Namespace) -> None:
    """``dundi export``: the run as a plain module (:mod:`dundi.run.export`)."""
    if read_meta(args.run).get("kind") != "dundi":
        raise DundiError(f"{args.run} is a native run: `dundi export` takes a DunDi run with an oracle index")
    meta = export_run(Run.load(args.run), args.out, rule_from_args(args))
    rule = meta["rule"]
    print(f"wrote {args.out}: TorchScript, images (N, {', '.join(map(str, meta['in_shape']))}) in [0, 1] -> "
          f"(N, {len(meta['classes'])}) scores, argmax = Algorithm 1 at n={rule['n']}, m={rule['m']}, "
          f"k={rule['k']} ({rule['metric']}){'; certified run' if 'certificate' in meta else ''}", file=sys.stderr)
    if args.json:
        emit(meta, True, "")


def cmd_demo(args: argparse.Namespace) -> None:
    figures = run_demo(Path(args.out), data_dir=args.data_dir, quick=args.quick,
                       progress=not args.no_progress)
    emit(figures, args.json, f"demo results in {args.out}")
