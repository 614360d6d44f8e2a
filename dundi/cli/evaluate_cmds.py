"""`dundi evaluate`, `dundi transfer` and `dundi report`, the parser half (the handlers:
dundi.cli.evaluate_handlers). The defaults are :class:`~dundi.evaluation.config.EvalConfig`'s
own; this module imports no torch."""

from __future__ import annotations

import argparse

from dundi.cli.args import add_two_step_args, handler, nonnegative_float, nonnegative_int, positive_float, positive_int
from dundi.data.specs import SPLITS
from dundi.evaluation.config import DEVICE_HELP, EvalConfig

HANDLERS = "dundi.cli.evaluate_handlers"


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


def register(sub: argparse._SubParsersAction) -> None:
    d = EvalConfig(run="")  # the defaults shown are the config's own
    p = sub.add_parser("evaluate", help="attack a DunDi run under named threat models; one Parquet "
                       "row per (sample, attack, eps, threat)")
    p.add_argument("run", help="DunDi run directory (with its oracle index)")
    p.add_argument("--native", default=None, help="native run: the transfer threat model's target "
                   "and the native columns (default: none; required by --threat transfer)")
    p.add_argument("--attacks", nargs="+", default=["paper"],
                   help="attack names, 'paper' (fgsm ifgsm-a ifgsm-b jsma, default), 'autoattack' "
                        "(APGD-CE, APGD-T, FAB-T, Square as a cascade; + step-1 APGD on adaptive) or 'all'")
    p.add_argument("--threat", nargs="+", default=d.threats,
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
    p.add_argument("--split", default=d.split, choices=SPLITS, help="dataset split")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the sample choice and the attacks")
    p.add_argument("--shard-size", type=positive_int, default=d.shard_size, help="samples per shard (unit of resume)")
    add_two_step_args(p)
    p.add_argument("--n-values", nargs="+", type=positive_int, default=d.n_values,
                   help="also classify at these n (Table 1, Fig. 7)")
    p.add_argument("--temperature", type=positive_float, default=d.temperature, help="divides the attacked scores")
    p.add_argument("--nearest", type=positive_int, default=d.nearest, help="oracles per class in the feature threat model")
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
    p.add_argument("--device", default=d.device,
                   help=f"{DEVICE_HELP}: networks and attacks there (one process on a GPU; with "
                        f"--workers, a GPU per Ray worker); the oracle index searches where it always "
                        f"does (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it only shows on a terminal)")
    p.add_argument("--json", action="store_true", help="print the summary table as one JSON object, last")
    p.set_defaults(handler=handler(HANDLERS, "cmd_evaluate"))

    _register_transfer(sub, d)

    p = sub.add_parser("report", help="Markdown + PNG report from evaluation directories")
    p.add_argument("results", nargs="+", help="evaluation directories (one per model / tuple count)")
    p.add_argument("--out", required=True, help="directory for the report and its plots")
    p.add_argument("--json", action="store_true", help="print the report's paths as one JSON object, last")
    p.set_defaults(handler=handler(HANDLERS, "cmd_report"))


def _register_transfer(sub: argparse._SubParsersAction, d: EvalConfig) -> None:
    p = sub.add_parser("transfer", help="craft one adversarial set on a source model and score many runs "
                       "on it (the paper's shared-source transfer protocol)")
    p.add_argument("source", help="native run the attacks are crafted on (e.g. --model feinman-cnn)")
    p.add_argument("--targets", nargs="+", required=True,
                   help="runs scored on the set: DunDi runs (their served two-step rule) and native runs")
    p.add_argument("--attacks", nargs="+", default=["paper"],
                   help="attack names or 'paper' (fgsm ifgsm-a ifgsm-b jsma, default)")
    p.add_argument("--eps", nargs="+", type=nonnegative_float, default=None,
                   help="budgets for attacks that take one (default: each attack's paper setting)")
    p.add_argument("--steps", type=positive_int, default=None, help="iterations (default: each attack's)")
    p.add_argument("--attack-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra attack setting, as for `dundi evaluate` (default: none)")
    p.add_argument("--limit", type=limit_arg, default=None,
                   help="N samples (the seeded choice of `dundi evaluate`) or 'all' (default)")
    p.add_argument("--split", default=d.split, choices=SPLITS, help="dataset split")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the sample choice and the attacks")
    p.add_argument("--batch-size", type=positive_int, default=d.shard_size,
                   help="images per attack call (the images crafted do not depend on it)")
    p.add_argument("--out", required=True, help="transfer directory: sets, rows, transfer.json (rerun to resume)")
    p.add_argument("--data-dir", default=None,
                   help="dataset cache (default: $DUNDI_DATA_DIR, else the user cache dir)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object, last")
    p.set_defaults(handler=handler(HANDLERS, "cmd_transfer"))
