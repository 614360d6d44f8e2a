"""`dundi evaluate` (attack suite × threat models, fanned out over Ray, rows to Parquet) and
`dundi report` (Markdown + PNG: the paper's Table 1, Fig. 6, Table 2, Fig. 7, robust accuracy
vs eps per threat model)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from dundi.cli import flag_values as choices
from dundi.cli.args import add_two_step_args, emit, nonnegative_float, nonnegative_int, positive_float, positive_int
from dundi.errors import DundiError


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
    from dundi.attacks import ATTACKS, STAND_IN_ONLY
    from dundi.evaluation.config import PAPER_ATTACKS

    everything = [a for a in ATTACKS if a not in STAND_IN_ONLY]
    out: list[str] = []
    for name in names:
        expanded = list(PAPER_ATTACKS) if name == "paper" else everything if name == "all" else [name]
        out += [a for a in expanded if a not in out]
    return out


def limit_arg(text: str) -> int | None:
    """``--limit``: a positive number of samples, or ``all`` for the whole split."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of samples or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of samples or 'all', got {value}")
    return value


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
    from dundi.evaluation.config import EvalConfig
    from dundi.evaluation.evaluate import evaluate_local
    from dundi.evaluation.results import json_safe
    from dundi.evaluation.summary import summarize

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
    from dundi.evaluation.certified_eval import certified_summary, certify_evaluation

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
    from dundi.evaluation.report import write_report
    from dundi.evaluation.results import json_safe

    figures = write_report(args.results, args.out)
    if args.json:
        emit(json_safe({"report": figures["report"], "plots": figures["plots"],
                        "evaluations": figures["evaluations"]}), True)
    else:
        print(f"report: {figures['report']}")
        for name in figures["plots"]:
            print(f"  plot: {Path(args.out) / name}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="attack a DunDi run under named threat models; one Parquet "
                       "row per (sample, attack, eps, threat)")
    p.add_argument("run", help="DunDi run directory (with its oracle index)")
    p.add_argument("--native", default=None, help="native run: the transfer threat model's target "
                   "and the native columns (default: none; required by --threat transfer)")
    p.add_argument("--attacks", nargs="+", default=["paper"],
                   help="attack names, 'paper' (fgsm ifgsm-a ifgsm-b jsma, default), 'autoattack' "
                        "(APGD-CE, APGD-T, FAB-T, Square as a cascade; + step-1 APGD on adaptive) or 'all'")
    p.add_argument("--threat", nargs="+", default=["transfer"],
                   help="transfer (paper: crafted on the native model; default) | adaptive (white-box on "
                        "DunDi's two-step rule as deployed) | adaptive-all (the all-class score) | "
                        "feature (pull f(x) to another class's oracles)")
    p.add_argument("--eps", nargs="+", type=nonnegative_float, default=None,
                   help="budgets for attacks that take one (default: each attack's paper setting)")
    p.add_argument("--steps", type=positive_int, default=None, help="iterations (default: each attack's)")
    p.add_argument("--attack-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra attack setting, e.g. loss=margin, restarts=5, alpha=0.005 (repeatable; "
                        "selected attacks that do not take it ignore it; a key none takes is refused; "
                        "default: none)")
    p.add_argument("--limit", type=limit_arg, default=None,
                   help="evaluate N samples (seeded random choice) or 'all' (the whole split; default)")
    p.add_argument("--split", default="test", choices=choices.SPLITS, help="dataset split")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample choice and the attacks")
    p.add_argument("--shard-size", type=positive_int, default=choices.EVAL_SHARD_SIZE, help="samples per shard (unit of resume)")
    add_two_step_args(p)
    p.add_argument("--n-values", nargs="+", type=positive_int, default=[1, 10, 20],
                   help="also classify at these n (Table 1, Fig. 7)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="divides the attacked scores")
    p.add_argument("--nearest", type=positive_int, default=3, help="oracles per class in the feature threat model")
    p.add_argument("--save-adv", action="store_true", help="keep adversarial images in the rows")
    p.add_argument("--workers", type=nonnegative_int, default=None,
                   help="Ray worker actors, one CPU each; 0 = this process, no Ray (default: on one machine "
                        "the first shards run in this process and the measured use of the cores decides "
                        "where the rest runs; with --address, all CPUs of the cluster)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="with --workers 0: shards run at once in this process, one torch thread each "
                        "(default: one per core); the rows are the same for any value")
    p.add_argument("--out", required=True, help="evaluation directory (rerun to resume)")
    p.add_argument("--data-dir", default=None,
                   help="dataset cache (default: $DUNDI_DATA_DIR, else the user cache dir)")
    from dundi.evaluation.config import DEVICE_HELP, EvalConfig

    device = EvalConfig.__dataclass_fields__["device"].default
    p.add_argument("--device", default=device,
                   help=f"{DEVICE_HELP}: networks and attacks there (one process on a GPU; with "
                        f"--workers, a GPU per Ray worker); the oracle index searches where it always "
                        f"does (default: {device})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it only shows on a terminal)")
    p.add_argument("--json", action="store_true", help="print the summary table as one JSON object, last")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("report", help="Markdown + PNG report from evaluation directories")
    p.add_argument("results", nargs="+", help="evaluation directories (one per model / tuple count)")
    p.add_argument("--out", required=True, help="directory for the report and its plots")
    p.add_argument("--json", action="store_true", help="print the report's paths as one JSON object, last")
    p.set_defaults(handler=cmd_report)
