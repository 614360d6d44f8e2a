"""Start or join Ray, once per process, without ever hanging on a bad address.

``init_ray(None)`` starts an embedded local Ray (or, inside a Ray job, where ``RAY_ADDRESS``
is set, joins the cluster that runs the job). ``init_ray("host:port")`` joins a running
cluster; ``"auto"`` finds one started on this machine with ``ray start``; ``"ray://host:port"``
goes through Ray Client. A second call is a no-op.

Ray itself retries an unreachable GCS address for minutes, so the address is probed with a
plain TCP connection first and a refusal or timeout becomes a :class:`DundiError`.
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

from dundi.errors import DundiError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
DEFAULT_GCS_PORT = 6379


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS or Ray Client address, or None for symbolic ones ("auto")."""
    if address in ("auto", "local"):
        return None
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if not parsed.hostname:
        raise DundiError(f"--address {address!r} is not host:port, ray://host:port or 'auto'")
    try:
        port = parsed.port or (10001 if parsed.scheme == "ray" else DEFAULT_GCS_PORT)
    except ValueError:
        raise DundiError(f"--address {address!r} has an invalid port") from None
    return parsed.hostname, port


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise DundiError unless a TCP connection to the address opens within ``timeout``."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as exc:
        raise DundiError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); "
                         f"check the address, or start one (cluster/local_cluster.py up, or "
                         f"`ray start --head`), or omit --address to use a local Ray") from None


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> dict:
    """Start a local Ray (``address=None``) or join a cluster; idempotent.

    ``num_cpus`` only applies to a local Ray that this call starts (Ray refuses it when
    joining). Extra keyword arguments go to ``ray.init``. Returns the cluster's resources.
    """
    import ray

    if ray.is_initialized():
        _check_same_cluster(address)
        return dict(ray.cluster_resources())
    env_address = os.environ.get("RAY_ADDRESS")
    if address is None and env_address:  # inside a Ray job, or the user exported it
        address = env_address
    kwargs.setdefault("log_to_driver", True)
    if address is None or address == "local":
        kwargs.setdefault("include_dashboard", False)
        ray.init(address="local", num_cpus=num_cpus, **kwargs)  # never join a stray cluster
        log.info("started a local Ray: %s", ray.cluster_resources())
    else:
        if num_cpus is not None:
            log.info("ignoring num_cpus=%s: joining the cluster at %s", num_cpus, address)
        check_reachable(address)
        enable_local_token_auth(address)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise DundiError(f"cannot join the Ray cluster at {address}: {exc}") from None
        except Exception as exc:
            if type(exc).__name__ == "AuthenticationError":
                raise DundiError(f"the Ray cluster at {address} refused this client's token: "
                                 f"{AUTH_HINT}") from None
            raise
    return dict(ray.cluster_resources())


AUTH_HINT = ("clusters with token authentication need RAY_AUTH_MODE=token and the cluster's token "
             "in ~/.ray/auth_token, $RAY_AUTH_TOKEN or the file named by $RAY_AUTH_TOKEN_PATH")


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return os.path.isfile(path)


def enable_local_token_auth(address: str | None) -> bool:
    """Send this user's Ray token to a cluster on this machine that asks for one.

    Ray protects clusters with a token (``~/.ray/auth_token``) but enables it in a client only
    when the cluster is found implicitly (no address, or "auto"); a local cluster named by its
    address (``--address 127.0.0.1:6379`` or a dashboard URL) is treated the same way here,
    but only when it refuses a client without a token: a client in token mode on a cluster
    without tokens connects, and then the cluster cannot reach the client to ask whether its
    actors are still referenced, so it destroys each actor before it starts (measured: a
    2-node ``ray.cluster_utils.Cluster``). For a remote cluster, set ``RAY_AUTH_MODE=token``
    yourself, as Ray asks.
    """
    if "RAY_AUTH_MODE" in os.environ or not is_local_address(address) or not _token_available():
        return False
    from dundi.distributed.ray_private import cluster_wants_token, enable_token_auth

    target = _host_port(address) if address and "://" not in address else None  # a GCS address
    if target is not None and cluster_wants_token(f"{target[0]}:{target[1]}") is False:
        return False

    if not enable_token_auth():  # it also refreshes Ray's cached config, read at import
        os.environ["RAY_AUTH_MODE"] = "token"
    return True


def _check_same_cluster(address: str | None) -> None:
    """This process is already in a Ray cluster: refuse a request for a different one."""
    import ray

    if address in (None, "", "auto", "local") or address.startswith("ray://"):
        return
    current = ray.get_runtime_context().gcs_address or ""
    target = _host_port(address)
    cur_port = current.rsplit(":", 1)[-1]
    if target is not None and cur_port.isdigit() and int(cur_port) != target[1]:
        raise DundiError(f"this process is already connected to the Ray cluster at {current}; "
                         f"it cannot also join {address} (use a new process)")


def is_local_address(address: str | None) -> bool:
    """True when ``address`` names this machine (or no cluster at all)."""
    if address in (None, "", "auto", "local"):
        return True
    target = _host_port(address)
    if target is None:
        return True
    host = target[0]
    if host in ("localhost", "127.0.0.1", "::1", "0.0.0.0"):
        return True
    try:  # an address of this machine is one we can bind to
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((socket.gethostbyname(host) if family == socket.AF_INET else host, 0))
        return True
    except OSError:
        return False
