"""``dundi serve``, the parser half: the online two-step classification endpoint (Ray Serve,
or plain uvicorn); the handler: dundi.cli.serve_handlers. Imports no torch."""

from __future__ import annotations

import argparse

from dundi.cli.args import (
    add_two_step_args,
    handler,
    nonnegative_float,
    open_fraction,
    port_number,
    positive_float,
    positive_int,
    unit_float,
)
from dundi.distributed.ingress import INGRESS_MODES
from dundi.rule.abstain_store import CALIBRATION_LIMIT, FALSE_ABSTAIN_RATE
from dundi.serving.settings import SERVICE_HOST, SERVICE_PORT, DeploymentSettings, ServeSettings

HANDLERS = "dundi.cli.serve_handlers"
# the defaults of the flags below are the declarations' own (one home per setting)
DEPLOY = DeploymentSettings()
LIMITS = ServeSettings()


def _autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--autoscale wants MIN:MAX (e.g. 1:4), got {text!r}") from None
    if lo < 0 or hi < 1 or lo > hi:
        raise argparse.ArgumentTypeError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def abstain_choice(text: str) -> float | str | None:
    """--abstain-threshold: "calibrated" (None), "none", or a positive distance."""
    if text in ("none", "calibrated"):
        return None if text == "calibrated" else "none"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--abstain-threshold wants calibrated, none or a positive "
                                         f"distance, got {text!r}")
    return value


def add_abstain_args(group) -> None:
    """The abstain flags shared by `serve` and `classify IMAGES`."""
    group.add_argument("--abstain-threshold", type=abstain_choice, default=None, metavar="calibrated|none|D",
                       help="answer 'unknown' for inputs unlike the held-out data: calibrated (default: the "
                            "rule `dundi index calibrate` stored, else calibrated at start), none (never "
                            "abstain), or a nearest-oracle distance D (that signal only)")
    group.add_argument("--false-abstain", type=open_fraction, default=None, metavar="RATE",
                       help="calibrate the rule now at this share of clean held-out images abstaining "
                            f"(default: the stored rule, else {FALSE_ABSTAIN_RATE})")
    group.add_argument("--calibration-limit", type=positive_int, default=CALIBRATION_LIMIT,
                       help="held-out images to calibrate on (default %(default)s)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="online two-step classification endpoint (Ray Serve; v2 inference protocol)",
        description="Deploy a DunDi run as an HTTP service: Open Inference Protocol v2 "
                    "(POST /v2/models/dundi/infer, GET /v2/health/live|ready, GET /v2/models/dundi) "
                    "and POST /classify (PNG/JPEG uploads or JSON arrays). Binds to 127.0.0.1 unless --host.")
    p.add_argument("run", help="DunDi run directory with an oracle index")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=positive_int, default=DEPLOY.replicas,
                       help="replicas, each parsing and classifying (default %(default)s)")
    scale.add_argument("--autoscale", type=_autoscale, default=None, metavar="MIN:MAX",
                       help="autoscale between MIN and MAX replicas (default: off, a fixed --replicas)")
    p.add_argument("--target-ongoing", type=positive_float, default=DEPLOY.target_ongoing_requests,
                   help="autoscaling target of requests in flight per replica (default %(default)s)")
    p.add_argument("--host", default=SERVICE_HOST, help="address to bind (default loopback only)")
    p.add_argument("--port", type=port_number, default=SERVICE_PORT, help="TCP port of the service, 1-65535 (default %(default)s)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--num-cpus", type=positive_int, default=None,
                   help="CPUs of the local Ray this starts (default: all of this machine's)")
    p.add_argument("--detach", action="store_true", help="with --address: leave the app running and exit")
    p.add_argument("--ingress", choices=INGRESS_MODES, default=None,
                   help="how HTTP reaches the app: Serve's proxy actor (proxy), the ingress replica "
                        "listening itself (direct), or HAProxy in front of the replicas (haproxy) "
                        "(default: haproxy on a local Ray when its binary is found — the fastest in "
                        "bench/serve.py — else proxy; always proxy with --address)")
    p.add_argument("--haproxy-stats-port", type=port_number, default=0, metavar="PORT",
                   help="with --ingress haproxy: serve HAProxy's stats page on 127.0.0.1:PORT (default: off)")
    p.add_argument("--haproxy-metrics-port", type=port_number, default=0, metavar="PORT",
                   help="with --ingress haproxy: serve HAProxy's Prometheus metrics on 127.0.0.1:PORT "
                        "(default: off)")
    p.add_argument("--no-ray", action="store_true",
                   help="serve from this single process with uvicorn instead (same API, no Ray)")
    model = p.add_argument_group("two-step settings (swappable at runtime: POST /admin/reload)")
    add_two_step_args(model)
    add_abstain_args(model)
    model.add_argument("--certify-eps", type=unit_float, default=None, metavar="EPS",
                       help="certify each answer at this L-inf radius only (certified_radius is EPS or 0; "
                            "one interval pass, cheaper than the full radius) (default: the full radius)")
    model.add_argument("--no-certificates", dest="certificates", action="store_false",
                       help="answer a certified run without certificates (certified_radius null; the "
                            "cheapest answers)")
    model.add_argument("--data-dir", default=None,
                       help="dataset cache for calibrating (default: $DUNDI_DATA_DIR, else the user cache dir)")
    limits = p.add_argument_group("limits and access")
    limits.add_argument("--model-name", default=LIMITS.model_name,
                        help="the {name} in /v2/models/{name} (default %(default)s)")
    limits.add_argument("--max-batch", type=positive_int, default=LIMITS.max_batch,
                        help="images per request (default %(default)s)")
    limits.add_argument("--max-body-bytes", type=positive_int, default=LIMITS.max_body_bytes,
                        help="largest request body accepted, at least 1024; larger ones get 413 (default %(default)s)")
    limits.add_argument("--timeout", type=positive_float, default=LIMITS.request_timeout_s,
                        help="seconds a request may wait for the model (default %(default)s)")
    limits.add_argument("--max-pending", type=positive_int, default=LIMITS.max_pending,
                        help="inference requests in progress per process (per replica on Ray) before "
                             "more are answered 503 with Retry-After at once (default %(default)s)")
    limits.add_argument("--token", default=None,
                        help="require 'Authorization: Bearer TOKEN' (default: $DUNDI_SERVE_TOKEN, else no token; "
                             "prefer the variable: flags show in ps)")
    limits.add_argument("--admin-token", default=None,
                        help="enable POST /admin/reload with this bearer token (default: $DUNDI_ADMIN_TOKEN, "
                             "else reload is off; prefer the variable)")
    perf = p.add_argument_group("Ray Serve resources and batching")
    perf.add_argument("--batch-size", type=positive_int, default=DEPLOY.max_batch_size,
                      help="most images per model call; requests queued while the model works share the "
                           "next call (default %(default)s)")
    perf.add_argument("--batch-wait-ms", type=nonnegative_float, default=DEPLOY.batch_wait_timeout_s * 1000,
                      help="extra wait for a batch to fill, in ms, under load only: a request that finds "
                           "the model idle never waits (default %(default)s)")
    perf.add_argument("--replica-cpus", "--classifier-cpus", type=positive_float, default=DEPLOY.replica_cpus,
                      help="CPUs Ray reserves per replica (scheduling only, not a limit) (default %(default)s)")
    perf.add_argument("--torch-threads", type=positive_int, default=DEPLOY.torch_threads,
                      help="torch threads per replica (default %(default)s)")
    perf.add_argument("--access-log", action="store_true", help="log every request in Serve's replica logs")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object, last")
    p.set_defaults(handler=handler(HANDLERS, "cmd_serve"))
