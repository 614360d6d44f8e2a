"""`dundi serve` as users run it: a real subprocess on 127.0.0.1 (real Ray and Ray Serve, or
the plain uvicorn app with --no-ray), driven over HTTP.

Every batch size that matters (1, the edge batch ± 1, twice it, the limit) answers 200 with
the labels of the in-process ``Run.classify`` on the same images, and limit + 1 gets a 413,
on every backend: Serve's proxy, direct ingress, HAProxy, and plain uvicorn. One server runs at a time (module-scoped, parametrized by backend).
"""

from __future__ import annotations

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

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.realdata]

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 256                                 # `dundi serve`'s default --max-batch
BATCH_SIZES = [1, 63, 64, 65, 128, LIMIT]   # 64 = the ingress's edge batch
BACKENDS = ["proxy", "direct", "haproxy", "plain"]   # the three Serve ingress modes and --no-ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def v2(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


class Server:
    """A `dundi serve` subprocess in its own session, its output in a file for diagnostics."""

    def __init__(self, run: Path, extra: list[str], log_path: Path, env: dict | None = None):
        self.port = free_port()
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
    from dundi.artifacts import Run

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
    from dundi.artifacts import Run, index_file_key

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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_everything_it_started(mnist_runs, tmp_path, sig):
    """What systemd / Kubernetes (SIGTERM) and Ctrl-C (SIGINT) do: the command stops every
    process it started, frees every port they listened on, and says so in one line."""
    srv = Server(mnist_runs["dundi"], ["--num-cpus", "2"], tmp_path / "serve.log")
    try:
        srv.wait_ready()
        procs = started_by(srv.proc.pid)
        ports = listening_ports(procs)
        names = set(procs.values())
        assert srv.port in ports and {"raylet", "gcs_server"} <= names, (ports, names)
        rc = srv.stop(sig)
    finally:
        if srv.proc.poll() is None:
            os.killpg(srv.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = {pid: name for pid, name in procs.items() if pid in _processes()}
        still = ports & all_listening_ports()
        if not left and not still:
            break
        time.sleep(0.5)
    for pid in left:  # leave the machine clean even when the test fails
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left and not still, f"left running: {left}; still listening: {sorted(still)}"
    out = srv.output()
    assert rc == 0, (rc, out[-2000:])
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
    from dundi.cli.serve_cmds import default_ingress
    from dundi.distributed.serve_app import haproxy_binary

    assert default_ingress("ray://10.0.0.1:10001") == "proxy"
    assert os.path.exists(haproxy_binary())  # ray[serve] brings one here
    assert default_ingress(None) == "haproxy"
