"""`dundi evaluate` (attack suite × threat models, fanned out over Ray, rows to Parquet) and
`dundi report` (Markdown + PNG: the paper's Table 1, Fig. 6, Table 2, Fig. 7, robust accuracy
vs eps per threat model): the handler half (the flags: dundi.cli.evaluate_cmds)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from dundi.attacks import ATTACKS, STAND_IN_ONLY
from dundi.cli.args import emit
from dundi.errors import DundiError
from dundi.evaluation.certified_eval import certified_summary, certify_evaluation
from dundi.evaluation.config import PAPER_ATTACKS, EvalConfig
from dundi.evaluation.evaluate import evaluate_local
from dundi.evaluation.report import write_report
from dundi.evaluation.results import json_safe
from dundi.evaluation.summary import summarize


def _parse_attack_args(items: list[str]) -> dict:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, true, lists)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DundiError(f"--attack-arg {item!r} is not key=value (e.g. --attack-arg loss=margin)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _attacks(names: list[str]) -> list[str]:
    everything = [a for a in ATTACKS if a not in STAND_IN_ONLY]
    out: list[str] = []
    for name in names:
        expanded = list(PAPER_ATTACKS) if name == "paper" else everything if name == "all" else [name]
        out += [a for a in expanded if a not in out]
    return out


def _ci(interval) -> str:
    if not interval or interval[0] is None or any(isinstance(v, float) and math.isnan(v) for v in interval):
        return ""
    return f" [95% CI {100 * interval[0]:.1f}–{100 * interval[1]:.1f}%]"


def print_cost_and_sample(summary: dict) -> None:
    """The sample the figures rest on and what the evaluation cost, in one line each."""
    s = summary.get("sample") or {}
    if s:
        print(f"sample: {s['samples']} of {s['split_size']} {s['dataset']} {s['split']} images ({s['selection']}"
              f"{', seed ' + str(s['seed']) if s['selection'] != 'whole split' else ''})")
    c = summary.get("cost") or {}
    if c.get("image_attacks"):
        print(f"cost: {c['image_attacks']} image-attacks in {c['seconds']:.0f} s over {c['calls']} call(s): "
              f"{c['image_attacks_per_second']:.3g} image-attacks/s, "
              f"{c['core_seconds_per_1000']:.4g} core-seconds per 1,000 image-attacks")


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:6.2f}%"


def print_summary(summary: dict) -> None:
    clean = summary["clean_accuracy"]
    model = summary.get("model", {})
    print(f"{model.get('name', 'DunDi')} on {summary['dataset']}: {clean['count']} samples, "
          f"two-step n={clean.get('n')} m={clean.get('m')} k={clean.get('k')}; clean accuracy "
          f"DunDi {_pct(clean['dundi'])}{_ci(clean.get('dundi_ci95'))}, native {_pct(clean['native'])}")
    print(f"{'threat':9} {'attack':8} {'norm':4} {'eps':>9} {'steps':>5} {'defense':>8} "
          f"{'robust':>8} {'atk-succ':>8} {'native-rob':>10} {'rule≠stand-in':>13}")
    for r in summary["attacks"]:
        eps = "unbounded" if math.isinf(r["eps"]) else f"{r['eps']:g}"
        print(f"{r['threat']:9} {r['attack']:8} {r['norm']:4} {eps:>9} {r['steps']:>5} "
              f"{_pct(r['defense_success']):>8} {_pct(r['robust_accuracy']):>8} "
              f"{_pct(r['attack_success_rate']):>8} {_pct(r['native_robust_accuracy']):>10} "
              f"{_pct(r.get('rule_disagreement')):>13}")
    print("worst case over attacks, per sample:")
    for w in summary["worst_case"]:
        eps = "all" if w["norm"] == "any" else f"{w['eps']:g}"
        print(f"  {w['threat']:9} {w['norm']:4} eps={eps:<6} robust accuracy {_pct(w['robust_accuracy'])} "
              f"{_ci(w.get('robust_accuracy_ci95'))} (native {_pct(w['native_robust_accuracy'])}) over "
              f"{w['count']} samples: {', '.join(w['settings'])}")
    for c in summary.get("certified") or []:
        print(f"  certified  Linf eps={c['eps']:<6g} certified accuracy {_pct(c['certified_accuracy'])} "
              f"<= robust {_pct(c['robust_accuracy'])} <= clean {_pct(c['clean_accuracy'])} "
              f"over {c['count']} samples (no certified sample flipped)")
    print_cost_and_sample(summary)
    for warning in summary["warnings"]:
        print(f"WARNING: {warning}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    cfg = EvalConfig(run=args.run, native=args.native, attacks=_attacks(args.attacks),
                     threats=args.threat, eps=args.eps, steps=args.steps, seed=args.seed,
                     limit=args.limit, split=args.split, shard_size=args.shard_size, n=args.n, m=args.m,
                     k=args.k, n_values=args.n_values, temperature=args.temperature,
                     nearest=args.nearest, attack_kw=_parse_attack_args(args.attack_arg),
                     save_adv=args.save_adv, data_dir=args.data_dir, device=args.device)
    log = (lambda s: None) if args.json else print
    if args.workers == 0:
        timing = evaluate_local(cfg, args.out, progress=not args.no_progress, log=log, threads=args.threads)
    elif args.workers is None and args.address is None and not os.environ.get("RAY_ADDRESS"):
        from dundi.distributed.evaluate_job import evaluate_auto  # one machine: measured layout

        timing = evaluate_auto(cfg, args.out, progress=not args.no_progress, log=log)
    else:
        from dundi.distributed.evaluate_job import evaluate_on_ray

        timing = evaluate_on_ray(cfg, args.out, workers=args.workers, address=args.address,
                                 progress=not args.no_progress, log=log)
    summary = summarize(args.out)
    summary["timing"] = timing
    if certify_evaluation(args.out) is not None:  # a certifiable run: certificates beside the attacks
        summary["certified"] = certified_summary(args.out)
    if args.json:
        emit(json_safe(summary), True)
    else:
        print_summary(summary)
        print(f"rows: {summary['rows']} in {Path(args.out) / 'shards'}; "
              f"{timing['shards_run']} shards run, {timing['shards_skipped']} skipped (finished before), "
              f"{timing['seconds']} s")


def cmd_report(args: argparse.Namespace) -> None:
    figures = write_report(args.results, args.out)
    if args.json:
        emit(json_safe({"report": figures["report"], "plots": figures["plots"],
                        "evaluations": figures["evaluations"]}), True)
    else:
        print(f"report: {figures['report']}")
        for name in figures["plots"]:
            print(f"  plot: {Path(args.out) / name}")


def cmd_transfer(args: argparse.Namespace) -> int:
    """Craft once on the source, score every target; one line per target and attack."""
    from dundi.evaluation.transfer_set import TransferConfig, run_transfer

    cfg = TransferConfig(args.source, list(args.targets), attacks=_attacks(args.attacks), eps=args.eps,
                         steps=args.steps, seed=args.seed, limit=args.limit, split=args.split,
                         batch_size=args.batch_size, attack_kw=_parse_attack_args(args.attack_arg),
                         data_dir=args.data_dir)
    summary = run_transfer(cfg, args.out)
    print(f"sample: {summary['count']} {summary['source']['dataset']} {summary['split']} images "
          f"(seed {summary['seed']}); crafted on {summary['source']['run']}")
    for a in summary["attacks"]:
        print(f"  {a['attack']}: the source answers {100 * a['source_accuracy_adv']:.1f}% of its own set right")
    for t in summary["targets"]:
        parts = [f"{name} {100 * f['defense_success']:.1f}%{_ci(f['ci95'])}" for name, f in t["attacks"].items()]
        print(f"{t['target']} ({t['kind']}, clean {100 * t['clean_accuracy']:.1f}%): {'; '.join(parts)}")
    if args.json:
        emit(json_safe(summary), True)
    return 0
