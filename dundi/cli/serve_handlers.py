"""``dundi serve``, the handler half (the flags: dundi.cli.serve_cmds): check the address,
load the run as served, then serve it from this process (uvicorn) or on Ray Serve. Ray
(dundi.distributed) is imported only on the Ray path."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from dundi.cli.args import emit, served_model_from_args
from dundi.errors import DundiError
from dundi.serving.app import serve_plain
from dundi.serving.model import ABSTAIN_SIGNALS
from dundi.serving.settings import SERVICE_PORT, ServeSettings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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


def cmd_serve(args: argparse.Namespace) -> None:
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
    from dundi.distributed.ingress import ingress_environment

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
    from dundi.distributed.ingress import haproxy_binary

    try:
        haproxy_binary()
    except DundiError:
        return "proxy"
    return "haproxy"
