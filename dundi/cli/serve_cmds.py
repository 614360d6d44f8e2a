"""``dundi serve``: the online two-step classification endpoint (Ray Serve, or plain uvicorn)."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
import time

from dundi.cli.args import (
    add_two_step_args,
    emit,
    nonnegative_float,
    open_fraction,
    port_number,
    positive_float,
    positive_int,
    served_model_from_args,
    unit_float,
)
from dundi.errors import DundiError
from dundi.serving.settings import SERVICE_PORT, DeploymentSettings, ServeSettings

# the defaults of the flags below are the declarations' own (one home per setting)
DEPLOY = DeploymentSettings()
LIMITS = ServeSettings()

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--autoscale wants MIN:MAX (e.g. 1:4), got {text!r}") from None
    if lo < 0 or hi < 1 or lo > hi:
        raise argparse.ArgumentTypeError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def check_listen(host: str, port: int) -> None:
    """Refuse, in one line, a port outside 1-65535, a host that is not an address of this
    machine, or a port something already listens on: found before Ray starts, these would
    otherwise surface as a Ray traceback or (70000 mod 65536) a server on another port."""
    if isinstance(port, bool) or not 1 <= port <= 65535:
        raise DundiError(f"--port {port} is not a TCP port: give 1-65535 (the default is {SERVICE_PORT})")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DundiError(f"--host {host!r} does not resolve ({exc.strerror}); give an address of this "
                         f"machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DundiError(f"port {port} on {host} is already in use; stop what listens there "
                                 f"(ss -ltnp 'sport = :{port}') or choose another --port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise DundiError(f"--host {host} is not an address of this machine") from None
            raise DundiError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """SIGTERM (systemd, Kubernetes, ``kill``) stops the service the way Ctrl-C does: through
    the clean-up that stops Serve and the local Ray, then one stop line."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
                            "(default: the stored rule, else 0.01)")
    group.add_argument("--calibration-limit", type=positive_int, default=2000,
                       help="held-out images to calibrate on (default %(default)s)")


def cmd_serve(args: argparse.Namespace) -> None:
    from dundi.serving.model import ABSTAIN_SIGNALS
    from dundi.serving.settings import ServeSettings

    if args.no_ray or args.address is None:  # on a cluster the proxies listen on other hosts
        check_listen(args.host, args.port)
    config, model = served_model_from_args(args.run, args)
    settings = ServeSettings.create(auth_token=args.token, admin_token=args.admin_token,
                                    model_name=args.model_name, max_batch=args.max_batch,
                                    max_body_bytes=args.max_body_bytes, request_timeout_s=args.timeout,
                                    max_pending=args.max_pending)
    if args.host not in LOOPBACK and not settings.auth_token_sha256:
        print(f"dundi: warning: serving on {args.host} without a bearer token; set $DUNDI_SERVE_TOKEN "
              f"(or --token) unless the network in front of it authenticates", file=sys.stderr)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    figures = {"url": url, "run": config.run, "model_name": settings.model_name, "version": model.info.version,
               "dataset": model.info.dataset, "in_shape": list(model.info.in_shape),
               "n": model.rule.n, "m": model.rule.m, "k": model.rule.k, **{f: getattr(config, f) for f in ABSTAIN_SIGNALS},
               "auth": bool(settings.auth_token_sha256), "admin_reload": bool(settings.admin_token_sha256)}
    example = (f"  curl -s -F file=@digit.png {url}/classify\n"
               f"  curl -s -H 'Content-Type: application/json' -d @request.json "
               f"{url}/v2/models/{settings.model_name}/infer")
    if args.no_ray:
        _serve_plain(args, config, settings, model, figures, example)
        return
    http_port = _choose_ingress(args)
    app_args = _app_args(args, config, settings)
    del model
    _serve_on_ray(args, app_args, http_port, figures, example)


def _serve_plain(args: argparse.Namespace, config, settings, model, figures: dict, example: str) -> None:
    """One process, uvicorn, no Ray: the same API."""
    from dundi.serving.app import serve_plain

    emit({**figures, "backend": "uvicorn (single process, no Ray)"}, args.json, f"serving {figures['url']}")
    if not args.json:
        print(example)
    _stop_on_signals()  # uvicorn stops gracefully on either signal, then re-raises it here
    try:
        serve_plain(config, settings, args.host, args.port, torch_threads=args.torch_threads, model=model)
    except KeyboardInterrupt:
        pass
    print("dundi: service stopped", file=sys.stderr)


def _choose_ingress(args: argparse.Namespace) -> int:
    """Settle --ingress (set in the environment Ray starts with); returns the port Serve's own
    HTTP proxy takes (the service's port, except with direct ingress)."""
    from dundi.distributed.serve_app import ingress_environment

    if args.ingress is None:
        args.ingress = default_ingress(args.address)
    if args.ingress == "proxy":
        return args.port
    if args.address is not None:
        raise DundiError(f"--ingress {args.ingress} is chosen when Ray starts: start the cluster with the "
                         f"environment of `dundi serve --ingress {args.ingress}` (see README), or use "
                         f"--ingress proxy with --address")
    if args.ingress == "direct" and (args.replicas != 1 or args.autoscale):
        raise DundiError("--ingress direct serves from one replica on --port; for several, "
                         "use --ingress haproxy (it balances over them)")
    if args.ingress == "haproxy":  # HAProxy's files, private to this service; removed when it stops
        import tempfile

        args.private_dir = tempfile.mkdtemp(prefix="dundi-hap-")
    os.environ.update(ingress_environment(args.ingress, args.port, getattr(args, "private_dir", None),
                                          args.haproxy_stats_port, args.haproxy_metrics_port, args.max_pending))
    if args.ingress != "direct":
        return args.port
    with socket.socket() as s:  # Serve's own proxy still starts: keep it off the service's port
        s.bind((args.host, 0))
        return s.getsockname()[1]


def _app_args(args: argparse.Namespace, config, settings):
    """The Serve app's arguments: the model's, the HTTP layer's and the deployment's settings."""
    import dataclasses

    from dundi.distributed.serve_app import SETTINGS_RENAMED, ServeAppArgs

    lo, hi = args.autoscale if args.autoscale else (None, None)
    http = {SETTINGS_RENAMED.get(k, k): v for k, v in dataclasses.asdict(settings).items()}
    return ServeAppArgs(**dataclasses.asdict(config), **http, replicas=args.replicas, autoscale_min=lo,
                        autoscale_max=hi, target_ongoing_requests=args.target_ongoing,
                        replica_cpus=args.replica_cpus, torch_threads=args.torch_threads,
                        max_batch_size=args.batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000.0)


def _serve_on_ray(args: argparse.Namespace, app_args, http_port: int, figures: dict, example: str) -> None:
    """Start (or join) Ray, deploy, wait for a signal, and stop what was started."""
    from dundi.distributed.ray_init import init_ray
    from dundi.distributed.serve_app import APP_NAME, deploy, stop

    _stop_on_signals()
    local = args.address is None
    try:
        t0 = time.time()
        init_ray(args.address, num_cpus=args.num_cpus)
        _stop_on_signals()  # Ray's start installs a C++ SIGTERM handler that dumps a stack: ours wins
        deploy(app_args, host=args.host, port=http_port, address=args.address, num_cpus=args.num_cpus,
               access_log=args.access_log)
        scaling = (f"autoscale {app_args.autoscale_min}:{app_args.autoscale_max}" if args.autoscale
                   else f"{args.replicas} replica(s)")
        emit({**figures, "backend": f"Ray Serve ({args.ingress} ingress), {scaling}",
              "startup_s": round(time.time() - t0, 1)}, args.json, f"serving {figures['url']}")
        if args.detach and not local:
            return
        if args.detach:
            print("dundi: --detach keeps the app only on a cluster (--address); this local Ray ends with "
                  "the command", file=sys.stderr)
        if not args.json:
            print(example)
            print("Ctrl-C (or SIGTERM) stops the service.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if not (args.detach and not local):
            _stop_quietly(APP_NAME, local, stop)
        if getattr(args, "private_dir", None):
            import shutil

            shutil.rmtree(args.private_dir, ignore_errors=True)
    print("dundi: service stopped", file=sys.stderr)


def _stop_quietly(app_name: str, local: bool, stop) -> None:
    # a second signal must not cut the clean-up short and leave processes behind
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        stop(app_name, local_ray=local)
    except Exception as exc:  # what could not be stopped cleanly ends with this process anyway
        print(f"dundi: warning: incomplete shutdown ({type(exc).__name__}: {exc})", file=sys.stderr)


def default_ingress(address: str | None) -> str:
    """HAProxy measured fastest on every request shape of bench/serve.py (README); a cluster's
    ingress is fixed when its Ray starts, and a machine without the binary keeps Serve's proxy."""
    if address is not None:
        return "proxy"
    from dundi.distributed.serve_app import haproxy_binary

    try:
        haproxy_binary()
    except DundiError:
        return "proxy"
    return "haproxy"


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
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=port_number, default=SERVICE_PORT, help="TCP port of the service, 1-65535 (default %(default)s)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--num-cpus", type=positive_int, default=None,
                   help="CPUs of the local Ray this starts (default: all of this machine's)")
    p.add_argument("--detach", action="store_true", help="with --address: leave the app running and exit")
    p.add_argument("--ingress", choices=("proxy", "direct", "haproxy"), default=None,
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
    p.set_defaults(handler=cmd_serve)
