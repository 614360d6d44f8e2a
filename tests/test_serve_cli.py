"""`dundi serve` as users run it: a real subprocess on 127.0.0.1 (real Ray and Ray Serve, or
the plain uvicorn app with --no-ray), driven over HTTP.

Every batch size that matters (1, the edge batch ± 1, twice it, the limit) answers 200 with
the labels of the in-process ``Run.classify`` on the same images, and limit + 1 gets a 413,
on every backend: Serve's proxy, direct ingress, HAProxy, and plain uvicorn. One server runs at a time (module-scoped, parametrized by backend).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from dundi.distributed.haproxy_guard import NO_ADMIN_RETRY

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.realdata]

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 256                                 # `dundi serve`'s default --max-batch
EDGE = 16                                   # images per model call (DeploymentSettings.max_batch_size)
BATCH_SIZES = [1, EDGE - 1, EDGE, EDGE + 1, 64, 128, LIMIT]
BACKENDS = ["proxy", "direct", "haproxy", "plain"]   # the three Serve ingress modes and --no-ray
STOP_DEADLINE_S = 30.0                      # a signal stops everything well within this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def v2(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


class Server:
    """A `dundi serve` subprocess in its own session, its output in a file for diagnostics."""

    def __init__(self, run: Path, extra: list[str], log_path: Path, env: dict | None = None,
                 port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "dundi", "serve", str(run), "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     start_new_session=True)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"dundi serve exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"dundi serve not ready after {timeout} s:\n{self.output()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        """Send ``sig`` to the command (not its group: it must stop what it started itself)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"dundi serve ignored signal {sig} for {timeout} s:\n{self.output()[-3000:]}")
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def images(data_dir) -> np.ndarray:
    from dundi.data import load_split

    x, _, _ = load_split("mnist-10k", "test", data_dir, limit=LIMIT + 1)
    assert len(x) == LIMIT + 1
    return x


@pytest.fixture(scope="module")
def expected(mnist_runs, images) -> list[int]:
    from dundi.run.directory import Run

    return Run.load(mnist_runs["dundi"]).classify(images[:LIMIT]).labels.tolist()


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, mnist_runs, tmp_path_factory):
    extra = ["--no-ray"] if request.param == "plain" else ["--num-cpus", "2", "--ingress", request.param]
    extra += ["--abstain-threshold", "none"]  # labels compared with Run.classify, which never abstains
    srv = Server(mnist_runs["dundi"], extra, tmp_path_factory.mktemp("serve") / f"{request.param}.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("size", BATCH_SIZES)
def test_every_batch_size_answers_like_dundi_classify(server, images, expected, size):
    from dundi.serving.settings import DeploymentSettings

    assert DeploymentSettings().max_batch_size == EDGE, "update EDGE: the sizes around it are the edge cases"
    """Both routes that take arrays answer a batch of ``size`` with Run.classify's labels."""
    x = images[:size]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v2/models/dundi/infer", json=v2(x))
        assert r.status_code == 200, (size, r.status_code, r.text[:300])
        labels = next(o for o in r.json()["outputs"] if o["name"] == "label")["data"]
        assert labels == expected[:size]
        r = c.post("/classify", json=x.tolist())
        assert r.status_code == 200, (size, r.status_code, r.text[:300])
        assert [res["label"] for res in r.json()["results"]] == expected[:size]


def test_limit_plus_one_is_413(server, images):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for path, body in [("/v2/models/dundi/infer", v2(images)), ("/classify", images.tolist())]:
            r = c.post(path, json=body)
            assert r.status_code == 413 and r.json()["code"] == "batch_too_large", (path, r.status_code, r.text[:300])


# ---------------------------------------------------------------------------- start-up errors

def _serve_fails(run: Path, *extra: str) -> str:
    """Run `dundi serve` expecting a refusal: exit code 2 and one line on stderr, nothing else."""
    r = subprocess.run([sys.executable, "-m", "dundi", "serve", str(run), *extra], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("dundi: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    return lines[0]


@pytest.mark.parametrize("backend", ["ray", "plain"])
def test_bad_ports_are_one_line_errors(mnist_runs, backend):
    extra = ["--no-ray"] if backend == "plain" else []
    run = mnist_runs["dundi"]
    for port in ("70000", "0", "-1", "65536"):
        assert "1-65535" in _serve_fails(run, "--port", port, *extra)
    assert "not an address of this machine" in _serve_fails(run, "--host", "192.0.2.1", *extra)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert "already in use" in _serve_fails(run, "--port", port, *extra)


def test_metadata_names_the_run_without_paths(server, mnist_runs):
    """Clients learn which run answers (its name and hashes), never where it lives."""
    from dundi.run.directory import Run
    from dundi.run.storage import index_file_key

    run_dir = Path(mnist_runs["dundi"]).resolve()
    files = Run.load(run_dir).meta["files"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        texts = [c.get(path).text for path in ("/v2/models/dundi", "/v2", "/v2/health/ready")]
        texts.append(c.post("/classify", json=[[[0.5] * 28] * 28]).text)
        meta = c.get("/v2/models/dundi").json()["parameters"]
    for text in texts:
        assert str(run_dir.parent) not in text and str(Path.home()) not in text, text[:500]
    assert meta["run"] == run_dir.name
    assert (meta["weights_sha256"], meta["index_sha256"]) == (files["model.safetensors"], files[index_file_key(Run.load(run_dir).meta)])


# ---------------------------------------------------------------------------- shutdown

def _processes() -> dict[int, tuple[int, int, str]]:
    """pid → (ppid, session id, name) of every process on this machine."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    head, rest = f.read().rsplit(")", 1)
                fields = rest.split()
                if fields[0] != "Z":  # a zombie has exited; only its parent's wait is missing
                    out[int(entry)] = (int(fields[1]), int(fields[3]), head.split("(", 1)[1])
            except (OSError, IndexError):
                continue
    return out


def started_by(root: int) -> dict[int, str]:
    """Every live process the command started: its descendants and whatever runs in its
    session (daemons re-parented to init keep the session)."""
    procs = _processes()
    mine = {pid for pid, (_, sid, _) in procs.items() if sid == root}
    todo = [root]
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo.extend(p for p, (ppid, _, _) in procs.items() if ppid == pid and p not in mine)
    return {pid: procs[pid][2] for pid in mine if pid in procs}


def listening_ports(pids) -> set[int]:
    """TCP ports in LISTEN state owned by these processes."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def all_listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            ports.update(int(c[1].rsplit(":", 1)[1], 16) for c in (ln.split() for ln in f.readlines()[1:])
                         if c[3] == "0A")
    return ports


def _wait_gone(procs: dict[int, str], srv: Server, deadline_s: float) -> tuple[dict, set]:
    """Wait until none of ``procs`` and nothing else of the command's session runs, and
    nothing listens on the service port; returns what is left and the ports still held.
    (Ports are checked by owner: on a shared machine another user's Ray may bind a fixed
    port such as the dashboard agent's 52365 the moment ours lets it go.)"""
    deadline = time.monotonic() + deadline_s
    while True:
        alive = _processes()
        session = {pid: name for pid, (_, sid, name) in alive.items() if sid == srv.proc.pid}
        left = {**{pid: name for pid, name in procs.items() if pid in alive}, **session}
        still = listening_ports(left) | ({srv.port} & all_listening_ports())
        if (not left and not still) or time.monotonic() > deadline:
            return left, still
        time.sleep(0.2)


def _serving(srv: Server, deadline_s: float = 30.0) -> tuple[dict[int, str], set[int]]:
    """The command's processes and their listening ports once one of them listens on the
    service port: HAProxy is reloaded (a new process takes the port over) several times
    during start-up, so a single snapshot can fall between two of them."""
    deadline = time.monotonic() + deadline_s
    while True:
        procs = started_by(srv.proc.pid)
        ports = listening_ports(procs)
        if srv.port in ports:
            return procs, ports
        assert time.monotonic() < deadline, f"nothing started by the command listens on {srv.port}: " \
                                            f"{sorted(ports)} {sorted(set(procs.values()))}"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_everything_it_started(mnist_runs, tmp_path, sig):
    """What systemd / Kubernetes (SIGTERM) and Ctrl-C (SIGINT) do: the command stops every
    process it started, frees every port they listened on, and says so in one line."""
    srv = Server(mnist_runs["dundi"], ["--num-cpus", "2"], tmp_path / "serve.log")
    try:
        srv.wait_ready()
        procs, ports = _serving(srv)
        names = set(procs.values())
        assert {"raylet", "gcs_server"} <= names, (ports, names)
        t0 = time.monotonic()
        rc = srv.stop(sig)
        took = time.monotonic() - t0
    finally:
        if srv.proc.poll() is None:
            os.killpg(srv.proc.pid, signal.SIGKILL)
    left, still = _wait_gone(procs, srv, 20.0)
    for pid in left:  # leave the machine clean even when the test fails
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left and not still, f"left running: {left}; still listening: {sorted(still)}"
    out = srv.output()
    assert rc == 0, (rc, out[-2000:])
    print(f"stopped by {sig.name} in {took:.1f} s")
    assert took < STOP_DEADLINE_S, f"stopping took {took:.1f} s (about 4 s when it was written)"
    assert out.count("dundi: service stopped") == 1, out[-2000:]
    assert "SIGTERM received" not in out and "*** " not in out and "Traceback" not in out, out[-3000:]


def test_readiness_answers_at_once_during_start_up(mnist_runs, tmp_path):
    """From the moment the port accepts connections, /v2/health/ready answers at once (503
    while anything is missing, then 200) instead of holding the probe (direct ingress: the port
    is the replica's own, and it opens once the replica has loaded the model). A few probes
    after the first 200 give the median a steady state to speak for."""
    srv = Server(mnist_runs["dundi"], ["--num-cpus", "2", "--ingress", "direct"], tmp_path / "serve.log")
    answers: list[tuple[int, float]] = []
    after_ready = 0
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and srv.proc.poll() is None and after_ready < 10:
            t0 = time.perf_counter()
            try:
                status = httpx.get(f"{srv.url}/v2/health/ready", timeout=10).status_code
            except httpx.ConnectError:
                time.sleep(0.05)
                continue
            answers.append((status, time.perf_counter() - t0))
            after_ready += bool(after_ready or status == 200)
            time.sleep(0.02)
    finally:
        srv.stop()
    assert answers and answers[-1][0] == 200, (answers[-5:], srv.output()[-2000:])
    assert {s for s, _ in answers} <= {200, 503}, answers
    slow = sorted(t for _, t in answers)
    print(f"{len(answers)} readiness answers, {sum(s == 503 for s, _ in answers)} x 503; median "
          f"{1000 * slow[len(slow) // 2]:.0f} ms, max {1000 * slow[-1]:.0f} ms")
    assert slow[len(slow) // 2] <= 0.1 and slow[-1] <= 1.0, slow


def test_default_ingress_is_haproxy_locally_and_proxy_on_a_cluster():
    """HAProxy measured fastest in bench/serve.py; a cluster's ingress is fixed when its Ray
    starts, so --address keeps Serve's proxy."""
    from dundi.cli.serve_handlers import default_ingress
    from dundi.distributed.ingress import haproxy_binary

    assert default_ingress("ray://10.0.0.1:10001") == "proxy"
    assert os.path.exists(haproxy_binary())  # ray[serve] brings one here
    assert default_ingress(None) == "haproxy"


# ---------------------------------------------------------------------------- crashes

def _cmdlines(pids) -> dict[int, list[str]]:
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
    return out




def _rewritten(config: Path, timeout: float = 10.0) -> str:
    """HAProxy's config once the launcher has rewritten it. At each reload Serve writes its own
    version to the same path and starts the launcher, which rewrites it in place: a read in
    between sees Serve's version (measured: one read in a full test run did)."""
    deadline = time.monotonic() + timeout
    while True:
        text = config.read_text()
        if NO_ADMIN_RETRY in text:  # a line only the launcher writes
            return text
        assert time.monotonic() < deadline, f"the launcher never rewrote {config}:\n{text[:2000]}"
        time.sleep(0.05)


def test_kill_9_of_the_process_group_leaves_nothing_listening(mnist_runs, tmp_path):
    """What an OOM kill or a crashed supervisor does: SIGKILL to `dundi serve`'s whole process
    group, so no clean-up runs. HAProxy (the default ingress) must not outlive it holding the
    service port, and must never have listened anywhere but the service port (no stats or
    metrics on the network); a new `dundi serve` then starts on the same port."""
    srv = Server(mnist_runs["dundi"], ["--num-cpus", "2"], tmp_path / "serve.log")
    procs: dict[int, str] = {}
    try:
        srv.wait_ready()
        procs, _ = _serving(srv)
        haproxy = [pid for pid, name in procs.items() if name == "haproxy"]
        assert haproxy, f"no haproxy among {sorted(set(procs.values()))}"
        assert listening_ports(haproxy) <= {srv.port}, listening_ports(haproxy)  # never stats or metrics
        config = next(a[i + 1] for a in _cmdlines(haproxy).values() for i, x in enumerate(a) if x == "-f")
        text = _rewritten(Path(config))
        assert "listen stats" not in text and "frontend prometheus" not in text, text[:2000]
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(30)
        left, still = _wait_gone(procs, srv, 30.0)
        assert not left and not still, f"after kill -9 of the group: left running {left}; " \
                                       f"still listening {sorted(still)}"
    finally:
        for pid in procs:  # leave the machine clean even when the test fails
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    again = Server(mnist_runs["dundi"], ["--num-cpus", "2"], tmp_path / "again.log", port=srv.port)
    try:
        again.wait_ready()
        assert httpx.get(f"{again.url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        assert again.stop() == 0, again.output()[-2000:]


def _replicas(root: int) -> list[int]:
    procs = started_by(root)
    return sorted(pid for pid, a in _cmdlines(procs).items() if a and a[0].startswith("ray::ServeReplica"))


def _error_code(r: httpx.Response) -> str:
    try:
        return f"{r.json().get('code')} Retry-After={r.headers.get('retry-after')}"
    except ValueError:
        return r.text[:80]


async def _load_with_kill(url: str, bodies: list[dict], clients: int, seconds: float, kill_after: int,
                          kill) -> dict:
    """Closed-loop load, bounded in time and count; ``kill()`` runs once ``kill_after``
    requests have been answered (an event, not a sleep)."""
    stats = {"ok": 0, "failed": 0, "statuses": {}, "ok_at_kill": None, "victim": None}
    deadline = time.monotonic() + seconds
    reached = asyncio.Event()

    async def one(c: httpx.AsyncClient, j: int) -> None:
        for i in range(20000):
            if time.monotonic() > deadline:
                return
            try:
                r = await c.post("/v2/models/dundi/infer", json=bodies[(i * clients + j) % len(bodies)])
                status = 200 if r.status_code == 200 else f"{r.status_code} {_error_code(r)}"
            except httpx.HTTPError as exc:
                status = f"{type(exc).__name__}: {exc}"[:160]
            stats["ok" if status == 200 else "failed"] += 1
            if status != 200:
                stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
            if stats["ok"] >= kill_after:
                reached.set()

    async def killer() -> None:
        try:
            await asyncio.wait_for(reached.wait(), seconds)
        except asyncio.TimeoutError:
            return
        stats["ok_at_kill"], stats["victim"] = stats["ok"], kill()

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
        await asyncio.gather(killer(), *(one(c, j) for j in range(clients)))
    return stats


def test_a_replica_killed_under_load_leaves_no_request_unanswered(mnist_runs, tmp_path, images):
    """Two replicas behind the default ingress (HAProxy) under 16 clients; one replica's
    process gets a real SIGKILL. Inference is idempotent, so the requests it held are retried
    on the other replica: every request is answered 200, but for an answer the replica had
    begun (a 503 to retry, never a broken connection), and Serve starts a new replica."""
    srv = Server(mnist_runs["dundi"], ["--num-cpus", "2", "--replicas", "2"], tmp_path / "serve.log")
    try:
        srv.wait_ready()
        deadline = time.monotonic() + 60
        while len(_replicas(srv.proc.pid)) < 2:
            assert time.monotonic() < deadline, f"2 replica processes never seen: {started_by(srv.proc.pid)}"
            time.sleep(0.2)
        before = _replicas(srv.proc.pid)

        def kill() -> int:
            os.kill(before[0], signal.SIGKILL)
            return before[0]

        bodies = [v2(images[i:i + 1]) for i in range(32)]
        stats = asyncio.run(_load_with_kill(srv.url, bodies, 16, 12.0, 200, kill))
        print(f"replica kill under load: {stats}")
        assert stats["victim"] == before[0], f"the kill never ran (answers: {stats['ok']}): {stats}"
        assert stats["ok"] > stats["ok_at_kill"], f"nothing answered after the kill: {stats}"
        # A request is buffered whole in HAProxy before a replica is chosen, so every one the dying
        # replica held is replayed on the other. Except an answer it had begun writing (headers
        # out, body not: a window of microseconds): no proxy can replay that, and HAProxy answers
        # it 503 replica_lost with Retry-After instead of closing the connection mid-answer.
        # One answer at a time is written by a replica's event loop; two leaves room for Serve
        # handing a replica's messages over from its user-code thread in two batches.
        lost = stats["statuses"].get("503 replica_lost Retry-After=1", 0)
        assert stats["failed"] == lost and lost <= 2, \
            f"requests failed around the replica's death: {stats['statuses']} of {stats['ok']} answered"
        deadline = time.monotonic() + 120
        while True:
            now = _replicas(srv.proc.pid)
            if len(now) == 2 and before[0] not in now:
                break
            assert time.monotonic() < deadline, f"no replacement replica within 120 s: {now} (before {before})"
            time.sleep(0.5)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.post("/v2/models/dundi/infer", json=v2(images[:4])).status_code == 200
    finally:
        srv.stop()


def test_certify_eps_serves_the_certificate_at_that_eps_whatever_the_batch(certified_run, images, tmp_path):
    """`dundi serve --no-ray --certify-eps 0.05` (one torch thread, as served): every answer's
    certified_radius is 0.05 or 0, the same in batches of 1, 15 and 17, and exactly what
    ``Run.certifier(...).certified_at`` proves in-process on the same images."""
    import torch

    from dundi.rule.params import TwoStepRule
    from dundi.run.directory import Run

    eps, x = 0.05, images[:34]
    srv = Server(certified_run, ["--no-ray", "--certify-eps", str(eps), "--abstain-threshold", "none"],
                 tmp_path / "certify-eps.log")
    try:
        srv.wait_ready()
        assert httpx.get(f"{srv.url}/v2/models/dundi").json()["parameters"]["certify_eps"] == eps
        by_size = {}
        for size in (1, 15, 17):
            radii, labels = [], []
            for start in range(0, len(x), size):
                r = httpx.post(f"{srv.url}/classify", json=x[start:start + size].tolist(), timeout=60)
                assert r.status_code == 200, r.text[:300]
                radii += [res["certified_radius"] for res in r.json()["results"]]
                labels += [res["label"] for res in r.json()["results"]]
            by_size[size] = (labels, radii)
    finally:
        srv.stop()
    assert by_size[1] == by_size[15] == by_size[17]
    labels, radii = by_size[1]
    run = Run.load(certified_run)
    rule = TwoStepRule(None, 3, 5)
    assert labels == run.classify(x, rule).labels.tolist()
    proven = run.certifier(rule).certified_at(torch.from_numpy(x), torch.tensor(labels), eps).numpy()
    assert radii == [eps if ok else 0.0 for ok in proven]
    assert proven.any()  # some answers are certified: the comparison is not vacuous
