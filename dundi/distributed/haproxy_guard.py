"""Start Serve's HAProxy tied to the process that starts it, with private ports kept private.

Ray Serve runs HAProxy as a child of its proxy actor. Left as Serve configures it, HAProxy
outlives a crash (``kill -9`` of ``dundi serve``'s process group, an OOM kill): it keeps the
service port, answering 500 to everything, so a load balancer sees a live instance and a
restart on the same port fails; and it listens on ``*:8404`` (stats) and ``*:9101``
(Prometheus metrics) for the whole network. Serve offers no option for either.

So ``dundi serve --ingress haproxy`` points Serve at a launcher (this file, copied into the
service's private directory with the real binary's path appended: stdlib only, it must run
without DunDi importable) in place of the HAProxy binary. The launcher

* asks the kernel to send HAProxy SIGTERM when the process that started it dies
  (``PR_SET_PDEATHSIG``, kept across ``exec``), then ``exec``\\ s HAProxy in its own
  process, so the pid Serve manages, reloads (``-sf``) and stops is HAProxy's;
* rewrites the configuration file Serve wrote (in place: Serve recognises its HAProxy
  processes by that path in their command line) and starts HAProxy on it:
  the stats and metrics listeners are removed, or bound to 127.0.0.1 when a port is asked
  for; inference may be retried on another replica when one dies mid-request (Serve's own
  ``retry-on``, widened by :func:`dundi.distributed.ingress.ingress_environment`) but
  ``/admin/`` requests never are (they change state); a request is held until its whole
  body is in HAProxy's buffer (``option http-buffer-request``), because only a buffered
  request can be sent again; splicing (kernel zero-copy of bodies) is turned off for the same
  reason. HAProxy's own 503 (no replica ready) becomes a JSON 503 with ``Retry-After``
  instead of Serve's 500; it is also the answer during start-up, before the app's route
  exists (Serve answers 404 there), and under overload: each replica gets at most
  ``max_pending`` requests at once from HAProxy, as many again wait in HAProxy's queue (at
  most ``queue_timeout_s``), and a request that finds the queue that long gets the 503 at once,
  unlogged (Serve parses each logged request in Python: under overload, a seventh of a core);
* caps HAProxy's threads at the CPUs it may run on (Serve asks for 4 whatever the machine);
* turns an answer cut short into a JSON 503 with ``Retry-After`` (code ``replica_lost``). A
  replica writes an answer's headers and its body in two writes; killed between them (a window
  of microseconds, about 1% of the time at 190 answers/s), it leaves HAProxy a truncated
  response that no proxy can send again, since the answer has begun, and HAProxy would pass
  the headers on and then close the client's connection without the body. So HAProxy holds
  each answer until its body is in (``wait-for-body``) and answers the 503 in place of one
  whose body is shorter than its ``Content-Length``: the client gets an answer it can retry
  instead of a broken connection.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1
UNAVAILABLE_BODY = ('{"error": "no replica is ready to answer; retry after the Retry-After delay", '
                    '"code": "unavailable"}\n')
LOST_BODY = ('{"error": "the replica answering this request stopped before its answer was complete; retry '
             'after the Retry-After delay", "code": "replica_lost"}\n')


def _page_503(body: str) -> str:
    """A whole HTTP message, as HAProxy's ``errorfile`` wants it. Without ``Connection: close``:
    HAProxy keeps the client's connection when it can (it has the whole request), so a client
    refused under overload sends its next request without a new connection, which under
    overload would cost both sides more than the refusal itself."""
    return ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nCache-Control: no-cache\r\n\r\n{body}")


SERVICE_UNAVAILABLE = _page_503(UNAVAILABLE_BODY)
REPLICA_LOST = _page_503(LOST_BODY)
LOST_PAGE = "503-lost.http"  # REPLICA_LOST's file, beside the 503.http page in the service's directory
# a spliced request body bypasses HAProxy's buffer, so it could not be sent again to another replica
NO_RETRY_OPTIONS = ("option splice-request", "option splice-response")
NO_ADMIN_RETRY = "    http-request disable-l7-retry if { path_beg /admin/ }"
# Hold a request until its whole body is in HAProxy's buffer before choosing a replica: a body
# still streaming to a replica that dies cannot be sent again, and HAProxy 2.8 then closes the
# client's connection without an answer (measured: one lost request per replica kill at ~400
# requests/s; none with this option in 12 runs)
BUFFER_REQUEST = "    option http-buffer-request"
# `dundi serve` routes every path ("/") to its app, so a request reaches Serve's default backend
# only while the app's route is not registered yet (start-up): 503 + Retry-After, not Serve's 404
NOT_YET_ROUTED = "    http-request return status 503 errorfile {}"
# An answer is held until its body is in (at most 10 s: a replica writes it microseconds after
# the headers); one that declares up to WHOLE_ANSWER_BYTES (so all of it fits in the 64 kB buffer
# serve_app asks for) but whose body came short (the replica died in between) becomes the
# replica_lost 503. HEAD answers and 204/304 carry no body and are never checked.
WHOLE_ANSWER_BYTES = 32 * 1024
WAIT_FOR_BODY = "    http-response wait-for-body time 10s"
CUT_SHORT = ("    http-response set-var(txn.dundi_length) res.hdr(content-length)",
             "    http-response return status 503 errorfile {} if !{{ method HEAD }} !{{ status 204 304 }} "
             f"{{{{ var(txn.dundi_length) -m int le {WHOLE_ANSWER_BYTES} }}}} "
             "{{ res.body_len,sub(txn.dundi_length) lt 0 }}")

# A request that finds the queue as long as the replicas' capacity is refused at once (with the
# JSON 503) rather than after the queue timeout, and not logged: Serve's HAProxy manager parses
# every logged request in Python, which under 4x overload took a seventh of the server's core
# (HAProxy's own counters, on its stats page and Prometheus listener when asked for, count them)
QUEUE_ROOM = "    http-request set-var(txn.dundi_room) nbsrv,mul({})"
QUEUE_FULL_SILENT = "    http-request set-log-level silent if { queue,sub(txn.dundi_room) ge 0 }"
QUEUE_FULL = "    http-request return status 503 errorfile {} if {{ queue,sub(txn.dundi_room) ge 0 }}"


def _sections(text: str) -> list[list[str]]:
    """The config's lines grouped by section (a section starts at an unindented line)."""
    out: list[list[str]] = []
    for line in text.splitlines():
        if line and not line[0].isspace() or not out:
            out.append([])
        out[-1].append(line)
    return out


def _local_bind(section: list[str], port: int) -> list[str]:
    return [f"    bind 127.0.0.1:{port}" if ln.strip().startswith("bind ") else ln for ln in section]


def _limit_servers(section: list[str], server_maxconn: int, queue_timeout_s: float) -> list[str]:
    """Each replica takes at most ``server_maxconn`` requests at once; the rest wait in
    HAProxy's queue at most ``queue_timeout_s``, then get the JSON 503 (Retry-After)."""
    out = []
    for ln in section:
        words = ln.split()
        if words[:1] == ["server"] and "backup" not in words and "maxconn" not in words:
            ln = f"{ln} maxconn {server_maxconn}"
        out.append(ln)
        if words[:1] == ["backend"] and not any(w.strip().startswith("timeout queue") for w in section):
            out.append(f"    timeout queue {int(queue_timeout_s * 1000)}ms")
    return out


def _refuse_when_queued(section: list[str], server_maxconn: int, error_503: str) -> list[str]:
    """A request that finds the queue already as long as the replicas' capacity (``nbsrv`` ×
    ``server_maxconn``) is refused at once, unlogged, instead of waiting out the queue timeout:
    under overload most requests end this way, so they should cost as little as possible."""
    if QUEUE_ROOM.format(server_maxconn) in section:
        return section
    return [section[0], QUEUE_ROOM.format(server_maxconn), QUEUE_FULL_SILENT, QUEUE_FULL.format(error_503),
            *section[1:]]


def _threads(section: list[str], cpus: int) -> list[str]:
    """No more HAProxy threads than the CPUs it may run on: extra threads only contend."""
    out = []
    for ln in section:
        words = ln.split()
        if words[:1] == ["nbthread"] and len(words) == 2 and words[1].isdigit() and int(words[1]) > cpus:
            ln = f"    nbthread {cpus}"
        out.append(ln)
    return out


def _answers_whole(section: list[str], lost_page: str) -> list[str]:
    """A replica backend's answers held until whole; one cut short becomes the replica_lost 503."""
    if WAIT_FOR_BODY in section:
        return section
    return [section[0], WAIT_FOR_BODY, *(ln.format(lost_page) for ln in CUT_SHORT), *section[1:]]


def rewrite_config(text: str, error_503: str, stats_port: int = 0, metrics_port: int = 0,
                   server_maxconn: int = 0, queue_timeout_s: float = 1.0, cpus: int = 0) -> str:
    """Serve's HAProxy config with the changes above (a port of 0 removes that listener; a
    ``server_maxconn`` of 0 leaves the replicas unlimited; ``cpus`` > 0 caps HAProxy's threads)."""
    kept: list[str] = []
    for section in _sections(text):
        head = section[0].split()
        if head[:1] == ["global"] and cpus:
            section = _threads(section, cpus)
        elif head[:2] == ["frontend", "prometheus"]:
            section = _local_bind(section, metrics_port) if metrics_port else []
        elif head[:2] == ["listen", "stats"]:
            section = _local_bind(section, stats_port) if stats_port else []
        elif head[:2] == ["frontend", "http_frontend"] and NO_ADMIN_RETRY not in section:
            at = next((i for i, ln in enumerate(section) if ln.strip().startswith("bind ")), 0)
            section = section[:at + 1] + [NO_ADMIN_RETRY] + section[at + 1:]
        elif head[:1] == ["defaults"] and BUFFER_REQUEST not in section:
            section = section + [BUFFER_REQUEST]
        elif head[:2] == ["backend", "default_backend"]:
            section = [NOT_YET_ROUTED.format(error_503) if ln.strip().startswith("http-request return status 404")
                       else ln for ln in section]
        elif head[:1] == ["backend"]:
            section = _answers_whole(section, os.path.join(os.path.dirname(error_503), LOST_PAGE))
            if server_maxconn:
                section = _limit_servers(section, server_maxconn, queue_timeout_s)
                section = _refuse_when_queued(section, server_maxconn, error_503)
        section = [f"    errorfile 503 {error_503}" if ln.strip().startswith("errorfile 503 ") else ln
                   for ln in section if ln.strip() not in NO_RETRY_OPTIONS]
        kept.extend(section)
    return "\n".join(kept) + "\n"


def _die_with_parent() -> None:
    """SIGTERM when the starting process dies; exit now if it already has."""
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        sys.exit("haproxy launcher: the process that started HAProxy is gone")


def launch(real: str, argv: list[str], error_503: str, stats_port: int, metrics_port: int,
           server_maxconn: int = 0, queue_timeout_s: float = 1.0) -> None:
    """Rewrite the ``-f`` config, tie HAProxy's life to its parent and become HAProxy."""
    args = list(argv)
    if "-f" in args:  # rewritten in place: Serve finds its HAProxy processes by this path
        path = args[args.index("-f") + 1]
        with open(path) as f:
            text = rewrite_config(f.read(), error_503, stats_port, metrics_port, server_maxconn, queue_timeout_s,
                                  len(os.sched_getaffinity(0)))
        with open(f"{path}.tmp", "w") as f:
            f.write(text)
        os.replace(f"{path}.tmp", path)
    _die_with_parent()
    os.execv(real, [real, *args])


def install(directory: str, real: str, stats_port: int = 0, metrics_port: int = 0, server_maxconn: int = 0,
            queue_timeout_s: float = 1.0) -> str:
    """Write the launcher (this file plus its settings) and the JSON 503 pages into
    ``directory``; returns the launcher's path (for ``RAY_SERVE_HAPROXY_BINARY_PATH``)."""
    error_503 = os.path.join(directory, "503.http")
    for name, page in (("503.http", SERVICE_UNAVAILABLE), (LOST_PAGE, REPLICA_LOST)):
        with open(os.path.join(directory, name), "w") as f:
            f.write(page)
    with open(__file__) as f:
        source = f.read()
    path = os.path.join(directory, "haproxy")
    with open(path, "w") as f:
        f.write(f"#!{sys.executable} -IS\n{source}\n\nif __name__ == '__main__':\n"
                f"    launch({real!r}, sys.argv[1:], {error_503!r}, {int(stats_port)}, {int(metrics_port)}, "
                f"{int(server_maxconn)}, {float(queue_timeout_s)!r})\n")
    os.chmod(path, 0o700)
    return path
