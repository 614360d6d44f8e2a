"""The HAProxy launcher's config rewrite (dundi/distributed/haproxy_guard.py), Ray-free: the
stats and metrics listeners go (or move to loopback when a port is asked for), /admin/ is
never retried, splicing is off, HAProxy's own 503 becomes the JSON page, and a rewrite of a
rewritten file changes nothing. The launcher's effect on a real HAProxy (nothing left after
kill -9, only the service port listening) is tested in test_serve_cli.py."""

from __future__ import annotations

import os
import stat

from dundi.distributed.haproxy_guard import NO_ADMIN_RETRY, install, rewrite_config

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
    use_backend http-dundi if is_http-dundi
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
    assert rewrite_config(out, "/p/503.http") == out  # idempotent


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
