"""The HAProxy launcher's config rewrite (dundi/distributed/haproxy_guard.py), Ray-free: the
stats and metrics listeners go (or move to loopback when a port is asked for), /admin/ is
never retried, splicing is off, HAProxy's own 503 becomes the JSON page, and a rewrite of a
rewritten file changes nothing. The launcher's effect on a real HAProxy (nothing left after
kill -9, only the service port listening) is tested in test_serve_cli.py; the rewritten file is
checked by the real HAProxy binary (``haproxy -c``) and its start-up 503 answered over HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import threading
import time

import httpx
import pytest

from dundi.distributed.haproxy_guard import NO_ADMIN_RETRY, WHOLE_ANSWER_BYTES, install, rewrite_config
from waiting import wait_until

SERVE_CONFIG = """global
    stats socket /x/admin.sock mode 666 level admin expose-fd listeners
    maxconn 1024
defaults
    mode http
    option splice-request
    option splice-response
    option redispatch 1
    retry-on conn-failure empty-response junk-response
    errorfile 502 /x/500.http
    errorfile 503 /x/500.http
    errorfile 504 /x/500.http
frontend prometheus
    bind :9101
    mode http
    http-request use-service prometheus-exporter if { path /metrics }
    no log
frontend http_frontend
    bind 127.0.0.1:8000
    acl routes path -i /-/routes
    acl is_http-dundi path_beg /routed/
    use_backend http-dundi if is_http-dundi
    default_backend default_backend
backend default_backend
    http-request return status 404 content-type text/plain lf-string "Path \'%[path]\' not found."
backend http-dundi
    server SERVE_REPLICA_a 127.0.0.1:30000 check
listen stats
  bind *:8404
  stats enable
  stats uri /stats
"""


def test_listeners_removed_admin_not_retried_no_splicing_json_503():
    out = rewrite_config(SERVE_CONFIG, "/p/503.http")
    assert "prometheus" not in out and "listen stats" not in out and ":9101" not in out and ":8404" not in out
    assert "splice" not in out
    lines = out.splitlines()
    assert lines[lines.index("    bind 127.0.0.1:8000") + 1] == NO_ADMIN_RETRY  # in the service's frontend
    assert "    errorfile 503 /p/503.http" in lines and "    errorfile 502 /x/500.http" in lines
    assert "retry-on conn-failure empty-response junk-response" in out
    assert "server SERVE_REPLICA_a 127.0.0.1:30000 check" in out  # the rest untouched
    # a request is buffered whole before a replica is chosen, so it can be replayed on another
    assert lines.index("defaults") < lines.index("    option http-buffer-request") < lines.index("frontend http_frontend")
    # before the app's route exists (start-up), the JSON 503 with Retry-After instead of a 404
    assert "    http-request return status 503 errorfile /p/503.http" in lines and "status 404" not in out
    # a replica's answers are held until whole; one cut short becomes the replica_lost 503
    backend = lines[lines.index("backend http-dundi"):]
    assert backend[1] == "    http-response wait-for-body time 10s" and "errorfile /p/503-lost.http" in backend[3]
    assert "wait-for-body" not in out[:out.index("backend http-dundi")]  # not the start-up backend
    assert rewrite_config(out, "/p/503.http") == out  # idempotent


def test_an_answer_checked_whole_fits_haproxy_buffer():
    """An answer is checked for completeness only when all of it fits in HAProxy's buffer
    beside its headers; a larger one is forwarded as it comes (its length cannot be checked)."""
    from dundi.distributed.ingress import HAPROXY_BUFSIZE

    assert WHOLE_ANSWER_BYTES <= HAPROXY_BUFSIZE // 2


def test_asked_for_ports_listen_on_loopback_only():
    out = rewrite_config(SERVE_CONFIG, "/p/503.http", stats_port=18404, metrics_port=19101)
    assert "    bind 127.0.0.1:18404" in out and "    bind 127.0.0.1:19101" in out
    assert "*:" not in out and "bind :" not in out


def test_install_writes_an_executable_stdlib_only_launcher(tmp_path):
    path = install(str(tmp_path), "/usr/sbin/haproxy", 0, 0)
    assert os.stat(path).st_mode & stat.S_IXUSR and not os.stat(path).st_mode & stat.S_IRWXO
    text = open(path).read()
    assert text.startswith("#!") and "launch('/usr/sbin/haproxy'" in text
    assert "import dundi" not in text and "from dundi" not in text  # runs where DunDi is not importable
    page = (tmp_path / "503.http").read_bytes().decode()
    assert page.startswith("HTTP/1.1 503 ") and "Retry-After: 1\r\n" in page and '"code": "unavailable"' in page


def test_replicas_limited_to_max_pending_and_the_queue_bounded():
    out = rewrite_config(SERVE_CONFIG, "/p/503.http", server_maxconn=64, queue_timeout_s=1.0)
    assert "server SERVE_REPLICA_a 127.0.0.1:30000 check maxconn 64" in out
    backend = out[out.index("backend http-dundi"):out.index("listen stats") if "listen stats" in out else None]
    assert "timeout queue 1000ms" in backend
    assert rewrite_config(out, "/p/503.http", server_maxconn=64) == out  # idempotent
    backup = SERVE_CONFIG.replace("check\n", "check\n    server SERVE_PROXY_ACTOR-fallback 127.0.0.1:8500 check backup\n", 1)
    assert "8500 check backup\n" in rewrite_config(backup, "/p/503.http", server_maxconn=64)  # fallback unlimited


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _real_haproxy(tmp_path, replica_port: int = 30000, log_port: int = 0, **rewrite):
    """HAProxy (the binary Serve uses) on the rewritten SERVE_CONFIG (``rewrite``: more of
    rewrite_config's settings), its service URL yielded; with ``log_port``, every request
    HAProxy logs goes to that UDP port on loopback."""
    from dundi.distributed.ingress import haproxy_binary
    from dundi.errors import DundiError

    try:
        binary = haproxy_binary()
    except DundiError as exc:
        pytest.skip(f"no HAProxy binary: {exc}")
    port = _free_port()
    config = SERVE_CONFIG.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("/x/admin.sock", str(tmp_path / "a.sock"))
    config = config.replace("127.0.0.1:30000", f"127.0.0.1:{replica_port}")
    config = config.replace("defaults\n", "defaults\n    timeout connect 1s\n    timeout client 5s\n    timeout server 5s\n")
    if log_port:
        config = config.replace("defaults\n", f"defaults\n    log 127.0.0.1:{log_port} local0 debug\n    option httplog\n")
    install(str(tmp_path), binary)
    cfg = tmp_path / "haproxy.cfg"
    rewritten = rewrite_config(config, str(tmp_path / "503.http"), **rewrite)
    cfg.write_text(rewritten.replace("/x/500.http", str(tmp_path / "503.http")))
    check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "HAProxy did not open its port within 10 s"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_real_haproxy_accepts_the_rewrite_and_answers_503_before_any_route(tmp_path):
    """The rewritten config as HAProxy itself reads it: `haproxy -c` accepts it, and a request
    while no app route exists gets the JSON 503 with Retry-After (Serve's own config gave 404)."""
    with _real_haproxy(tmp_path) as url:
        r = httpx.post(f"{url}/v2/models/dundi/infer", json={}, timeout=5)
        # the refused client keeps its connection: a second request on it gets the same answer
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5) as conn:
            request = b"POST /v2/models/dundi/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"
            answers = []
            for _ in range(2):
                conn.sendall(request)
                answer = b""
                while not answer.endswith(b"}\n"):
                    chunk = conn.recv(65536)
                    assert chunk, f"HAProxy closed the connection after {len(answers)} answers: {answer!r}"
                    answer += chunk
                answers.append(answer)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["code"] == "unavailable"
    assert all(a.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in a.lower() for a in answers), answers


def _read_head(conn: socket.socket) -> bytes:
    """A request's line and headers as a stand-in replica reads them (b"" for a health check)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(65536)
        if not chunk:
            break
        head += chunk
    return head


def _answer_each(listener: socket.socket, answer) -> None:
    """A stand-in replica speaking raw HTTP/1.1: one request per connection, answered by
    ``answer(conn, head)``; connections without a request (health checks) are closed."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            head = _read_head(conn)
            if head:
                answer(conn, head)


def _replica(listener: socket.socket) -> None:
    """Answers chosen by path: /routed/cut writes the headers and dies before the body (what a
    SIGKILL between a replica's two writes leaves), the others answer whole (large, chunked,
    or HEAD)."""
    def answer(conn: socket.socket, head: bytes) -> None:
        method, path = head.split(b" ")[:2]
        body = b"x" * 100_000 if path.endswith(b"/large") else b'{"answer": 7}'
        if path.endswith(b"/chunked"):
            conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                         b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            return
        headers = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" \
                  b"connection: close\r\n\r\n" % len(body)
        conn.sendall(headers if path.endswith(b"/cut") or method == b"HEAD" else headers + body)

    _answer_each(listener, answer)


def test_an_answer_cut_short_by_a_dying_replica_becomes_a_503_to_retry(tmp_path):
    """Through the real HAProxy on the rewritten config: an answer whose replica died between
    its headers and its body reaches the client as the JSON 503 with Retry-After (code
    replica_lost), not as a 200 whose connection closes mid-body; whole answers pass unchanged,
    whatever their size or framing, and a HEAD answer (headers only) is not mistaken for one."""
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_replica, args=(listener,), daemon=True).start()
    try:
        with _real_haproxy(tmp_path, listener.getsockname()[1]) as url, httpx.Client(base_url=url, timeout=10) as c:
            cut = c.post("/routed/cut", json={})
            whole, large, chunked = (c.post(f"/routed/{p}", json={}) for p in ("whole", "large", "chunked"))
            head = c.head("/routed/whole")
    finally:
        listener.close()
    assert cut.status_code == 503 and cut.headers["retry-after"] == "1" and cut.json()["code"] == "replica_lost"
    assert whole.status_code == 200 and whole.json() == {"answer": 7}
    assert large.status_code == 200 and large.content == b"x" * 100_000  # beyond the buffer: forwarded as it comes
    assert chunked.status_code == 200 and chunked.json() == {"answer": 7}
    assert head.status_code == 200 and head.headers["content-length"] == str(len(b'{"answer": 7}'))


def test_threads_capped_at_the_cpus_haproxy_may_use():
    config = SERVE_CONFIG.replace("    maxconn 1024\n", "    maxconn 1024\n    nbthread 4\n")
    assert "    nbthread 1\n" in rewrite_config(config, "/p/503.http", cpus=1)
    assert "    nbthread 4\n" in rewrite_config(config, "/p/503.http", cpus=16)  # never raised
    assert "    nbthread 4\n" in rewrite_config(config, "/p/503.http")  # cpus unknown: left alone


def _held_replica(listener: socket.socket, release: threading.Event, served: list,
                  arrived: list | None = None) -> None:
    """A stand-in replica that answers one request at a time, each once ``release`` is set;
    ``arrived`` gets each request's path as soon as the replica holds it."""
    def answer(conn: socket.socket, head: bytes) -> None:
        if arrived is not None:
            arrived.append(head.split(b" ")[1])
        release.wait(30)
        served.append(head.split(b" ")[1])
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")

    _answer_each(listener, answer)


def test_a_full_queue_refuses_at_once_and_unlogged(tmp_path):
    """With the replica at its limit (1 request) and the queue as long as the replicas'
    capacity (1), the next request is refused with the JSON 503 while the first is still being
    answered, not after the queue timeout (30 s here), and the refusal is not logged (Serve
    parses every logged request) but still counted in HAProxy's statistics; the two admitted
    requests are answered and logged."""
    listener = socket.create_server(("127.0.0.1", 0))
    release, served, arrived = threading.Event(), [], []
    threading.Thread(target=_held_replica, args=(listener, release, served, arrived), daemon=True).start()
    logs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    logs.bind(("127.0.0.1", 0))
    logs.settimeout(0.2)
    results: dict = {}

    def send(name: str, url: str) -> None:
        results[name] = httpx.post(f"{url}/routed/{name}", json={}, timeout=60)

    try:
        with _real_haproxy(tmp_path, listener.getsockname()[1], logs.getsockname()[1],
                           server_maxconn=1, queue_timeout_s=30.0) as url:
            admitted = [threading.Thread(target=send, args=(name, url)) for name in ("first", "second")]
            # in order: the first held by the replica, then the second in HAProxy's queue
            admitted[0].start()
            wait_until(lambda: arrived == [b"/routed/first"], "the replica to hold the first request")
            admitted[1].start()
            wait_until(lambda: _stat(tmp_path / "a.sock", "http-dundi", "BACKEND", "qcur") == 1,
                        "HAProxy to queue the second request")
            refused = httpx.post(f"{url}/routed/third", json={}, timeout=60)
            answered_before_refusal = list(served)
            release.set()
            for t in admitted:
                t.join(60)
            lines = []
            with contextlib.suppress(socket.timeout):
                while True:
                    lines.append(logs.recv(65536).decode(errors="replace"))
            counted_5xx = _frontend_5xx(tmp_path / "a.sock")
    finally:
        listener.close()
        logs.close()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["code"] == "unavailable"
    assert answered_before_refusal == []  # refused while the first request was still held
    assert [results[n].status_code for n in ("first", "second")] == [200, 200] and served == [b"/routed/first", b"/routed/second"]
    logged = [ln for ln in lines if "/routed/" in ln]
    assert any("/routed/first" in ln for ln in logged) and any("/routed/second" in ln for ln in logged), lines
    assert not any("/routed/third" in ln for ln in logged), logged
    assert counted_5xx == 1  # unlogged, but counted by HAProxy's own statistics


def _frontend_5xx(admin_socket) -> int:
    """The 5xx answers HAProxy's service frontend has sent, read from its admin socket."""
    return _stat(admin_socket, "http_frontend", "FRONTEND", "hrsp_5xx")


def _stat(admin_socket, proxy: str, row: str, field: str) -> int:
    """One counter of HAProxy's `show stat` (``row``: FRONTEND, BACKEND or a server's name)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(admin_socket))
        s.sendall(b"show stat\n")
        text = b""
        while chunk := s.recv(65536):
            text += chunk
    rows = text.decode().splitlines()
    names = rows[0].lstrip("# ").split(",")
    found = next(r.split(",") for r in rows[1:] if r.startswith(f"{proxy},{row},"))
    return int(found[names.index(field)] or 0)

