"""Ray Serve endpoint, in each ingress mode, vs the same app behind plain single-process uvicorn.

In one run, closed loop (each client sends its next request when the previous answer arrives),
for one image per request at 1, 8 and 32 clients and for 16- and 64-image requests at 8
clients: requests/s, images/s, p50 and p99 latency, errors, and the server's CPU per request
(the whole process tree: Ray's GCS, raylet, proxy or HAProxy, replicas), for

* **proxy / direct / haproxy** — ``dundi serve --ingress MODE`` on a local Ray (one
  deployment that parses, batches adaptively and classifies), reached through
  Serve's proxy actor, the replica's own HTTP server, or HAProxy, and
* **plain** — ``dundi serve --no-ray``: the same FastAPI app (dundi.serving.app) and model in
  one uvicorn process, one request per model call (the reference).

Requests are v2 JSON inference requests of real mnist-10k test images, sent over loopback by
a minimal keep-alive HTTP/1.1 client (asyncio streams, pre-encoded requests), so the load
generator takes as little CPU as possible from the servers on a small machine. Every answer's
status is checked, and every distinct request's labels are compared with the in-process
``Run.classify`` labels: an image answered "unknown" (label -1) is counted as *abstained*,
apart from *wrong* (another label), so a real mismatch never hides among abstentions. The
servers run with ``--abstain-threshold none`` (as Run.classify, which never abstains) unless
``--abstain``. Targets (ratios to plain in the same run): p50 of a lone client ≤ 1.5× plain's
(goal 1.2×), single images at 32 clients ≥ 1× plain's requests/s, 64-image requests ≥ 0.9×
plain's images/s (goal 1.0×). The machine's load average is printed beside every figure.

    python bench/serve.py [--run RUN] [--modes proxy direct haproxy] [--duration 6]
    python bench/serve.py --modes haproxy --batch-size 16 64 --batch-wait-ms 0 2   # a sweep

Without --run, a small DunDi_R run is trained on mnist-10k first (≈ 10 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_run(out: Path, data_dir: str | None) -> Path:
    from dundi.run.pipeline import build_index, train_dundi_run
    from dundi.training.config import TrainConfig

    cfg = TrainConfig("mnist-10k", "lenet5", epochs=2, limit=3000, tuples=6000)
    train_dundi_run(cfg, out, None, data_dir, progress=False, log=lambda s: None)
    build_index(out, n=10, seed=0, data_dir=data_dir)
    return out


def requests_for(images: np.ndarray, expected: np.ndarray, port: int, batch: int,
                 count: int = 32) -> list[tuple[bytes, list[int]]]:
    """``count`` pre-encoded v2 requests of ``batch`` images each, with their expected labels."""
    out = []
    for j in range(count):
        idx = [(j * batch + i) % len(images) for i in range(batch)]
        x = images[idx]
        body = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        head = (f"POST /v2/models/dundi/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        out.append((head + body, expected[idx].tolist()))
    return out


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = b""  # chunked
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, body
        body += chunk[:-2]


async def client(port: int, reqs: list, offset: int, stop: float, lat: list, errors: list,
                 answers: dict) -> None:
    reader = writer = None
    i = offset
    while time.perf_counter() < stop:
        idx = i % len(reqs)
        i += 1
        t0 = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(reqs[idx][0])
            status, body = await asyncio.wait_for(read_response(reader), 60)
        except Exception as exc:  # a dropped connection counts as an error, then reconnect
            errors.append(type(exc).__name__)
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        if status != 200:  # a refusal (503) is not throughput: counted apart, never in rps or latency
            errors.append(status)
            continue
        lat.append(time.perf_counter() - t0)
        if idx not in answers:
            answers[idx] = json.loads(body)["outputs"][0]["data"]
    if writer is not None:
        writer.close()


async def load(port: int, reqs: list, concurrency: int, duration: float, warmup: float,
               server_cpu=lambda: 0.0) -> dict:
    await asyncio.gather(*(client(port, reqs, j * 7, time.perf_counter() + warmup, [], [], {})
                           for j in range(concurrency)))
    lat: list[float] = []
    errors: list = []
    answers: dict = {}
    cpu0 = server_cpu()
    t0 = time.perf_counter()
    await asyncio.gather(*(client(port, reqs, j * 7, t0 + duration, lat, errors, answers)
                           for j in range(concurrency)))
    elapsed = time.perf_counter() - t0
    cpu_ms = 1000 * (server_cpu() - cpu0) / max(1, len(lat))
    ms = np.array(lat) * 1000 if lat else np.array([np.nan])
    return {"concurrency": concurrency, "rps": len(lat) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "requests": len(lat), "errors": len(errors),
            "server_cpu_ms_per_req": cpu_ms, **answer_counts(answers, reqs)}


def answer_counts(answers: dict, reqs: list) -> dict:
    """Images answered "unknown" (label -1: the abstain rule, on by default) apart from images
    given a label other than Run.classify's (a real mismatch), over each distinct request."""
    abstained = wrong = 0
    for i, got in answers.items():
        for label, want in zip(got, reqs[i][1]):
            abstained += label == -1
            wrong += label != -1 and label != want
    return {"abstained": abstained, "mismatches": wrong}


def tree_pids(root: int) -> set[int]:
    """A process and all its descendants: the whole server, Ray's raylet, GCS, proxy and
    replicas included."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                continue
    mine, todo = set(), [root]
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo.extend(children.get(pid, []))
    return mine


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU time of a process and all its descendants."""
    return sum(cpu_seconds(pid) for pid in tree_pids(root))


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} not ready after {timeout} s")


def start(kind: str, run: Path, port: int, args: argparse.Namespace, batch: tuple[int, float] | None = None
          ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dundi", "serve", str(run), "--port", str(port), *args.serve_args]
    if kind == "plain":
        cmd.append("--no-ray")
    else:
        size, wait_ms = batch or (None, None)
        cmd += ["--ingress", kind, "--replicas", str(args.replicas), "--num-cpus", str(os.cpu_count() or 2)]
        cmd += ["--batch-size", str(size)] if size else []
        cmd += ["--batch-wait-ms", str(wait_ms)] if wait_ms is not None else []
    # Ray starts its workers at niceness 15; both servers run at the same niceness so that on
    # a shared machine neither is favoured by the scheduler.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_worker_niceness": str(args.niceness)}
    if kind != "plain" and args.throughput_optimized:
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # read by every Ray process: set before Ray starts
    nice = args.niceness if kind == "plain" else 0
    cpus = getattr(args, "service_cpus", None)  # the server and all it starts (Ray too) on these cores

    def preexec() -> None:
        if nice:
            os.nice(nice)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=preexec if nice or cpus else None)


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the CLI stops Serve and its local Ray
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _level(port: int, proc: subprocess.Popen, size: int, c: int, images, expected, args, label: str) -> dict:
    reqs = requests_for(images, expected, port, size)
    row = asyncio.run(load(port, reqs, c, args.duration, args.warmup, lambda: tree_cpu_seconds(proc.pid)))
    row["images_per_s"] = row["rps"] * size
    print(f"{label:16s} {size:2d} img x {c:2d} clients {row['rps']:7.1f} req/s "
          f"{row['images_per_s']:7.0f} img/s  p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
          f"errors {row['errors']}  abstained {row['abstained']}  wrong {row['mismatches']}  "
          f"server CPU {row['server_cpu_ms_per_req']:.1f} ms/req  (load {load_average()})", flush=True)
    return row


def measure_pair(kind: str, run: Path, args: argparse.Namespace, levels: list, images, expected,
                 batch: tuple[int, float] | None, label: str) -> tuple[dict, dict]:
    """Plain uvicorn and one Serve configuration, both started, measured level by level in
    turn (plain first at even levels, Serve first at odd ones): on a shared machine whose load
    drifts over minutes, each ratio compares figures taken seconds apart. The idle one of the
    two still runs meanwhile (Ray's idle processes take a few % of a core)."""
    ports = {"plain": free_port(), kind: free_port()}
    procs = {"plain": start("plain", run, ports["plain"], args), kind: start(kind, run, ports[kind], args, batch)}
    try:
        startup = {}
        for name, proc in procs.items():
            t0 = time.time()
            wait_ready(ports[name], proc)
            startup[name] = time.time() - t0
        rows: dict = {"plain": {}, kind: {}}
        for i, (size, c) in enumerate(levels):
            order = ["plain", kind] if i % 2 == 0 else [kind, "plain"]
            for name in order:
                rows[name][f"{size}x{c}"] = _level(ports[name], procs[name], size, c, images, expected, args,
                                                   "plain" if name == "plain" else label)
        return ({"startup_s": startup["plain"], "levels": rows["plain"]},
                {"startup_s": startup[kind], "levels": rows[kind]})
    finally:
        for proc in procs.values():
            stop(proc)


def verdicts(r: dict) -> str:
    """The targets of the issue that set them, as ratios to plain uvicorn in the same run."""
    out = []
    if "1x1" in r:
        out.append(f"p50 at 1 client {r['1x1']['p50']:.2f}x (target <= 1.5x, goal 1.2x) "
                   f"{'met' if r['1x1']['p50'] <= 1.5 else 'MISSED'}")
    if "1x32" in r:
        out.append(f"1 img x 32: {r['1x32']['throughput']:.2f}x req/s, p99 {r['1x32']['p99']:.2f}x "
                   f"(keep the gain: >= 1x) {'met' if r['1x32']['throughput'] >= 1 else 'MISSED'}")
    if "64x8" in r:
        out.append(f"64 img x 8: {r['64x8']['throughput']:.2f}x images/s (target 0.9x, goal 1.0x) "
                   f"{'met' if r['64x8']['throughput'] >= 0.9 else 'MISSED'}")
    return "; ".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--modes", nargs="+", default=["proxy", "direct", "haproxy"], choices=["proxy", "direct", "haproxy"])
    p.add_argument("--duration", type=float, default=6.0, help="seconds measured per level")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="for one image per request")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="images per request, at 8 clients")
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas")
    p.add_argument("--batch-size", type=int, nargs="+", default=[None],
                   help="images per model call; several values sweep (default: dundi serve's)")
    p.add_argument("--batch-wait-ms", type=float, nargs="+", default=[None],
                   help="extra wait for a batch to fill under load; several values sweep (default: dundi serve's)")
    p.add_argument("--niceness", type=int, default=0, help="niceness of both servers (Ray's default "
                   "for its workers is 15)")
    p.add_argument("--throughput-optimized", action="store_true",
                   help="start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (gRPC between deployments, no "
                        "separate user-code thread; it also turns on direct ingress)")
    p.add_argument("--abstain", action="store_true", help="keep the served run's abstain rule (default: "
                   "--abstain-threshold none, so answers compare with Run.classify's labels; abstained "
                   "answers are counted apart from mismatches either way)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.serve_args = [] if args.abstain else ["--abstain-threshold", "none"]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench/serve.py: stopped by SIGTERM"))  # servers stop too

    from dundi.data import load_split
    from dundi.run.directory import Run

    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else small_run(Path(tmp.name) / "dundi", args.data_dir)
    meta = Run.load(run).meta
    images, _, _ = load_split(meta["dataset"], "test", args.data_dir, limit=256)
    expected = Run.load(run).classify(images).labels  # default n, m, k: as the servers

    levels = [(1, c) for c in args.concurrency] + [(b, 8) for b in args.batches]
    print(f"load before: {load_average()} (cpus={os.cpu_count()}, replicas={args.replicas})", flush=True)
    results: dict[str, dict] = {}
    plains: dict[str, dict] = {}
    sweep = [(b, w) for b in args.batch_size for w in args.batch_wait_ms]
    for kind in args.modes:
        for b, w in sweep:
            label = kind if len(sweep) == 1 else f"{kind}/b{b}/w{w:g}"
            plains[label], results[label] = measure_pair(kind, run, args, levels, images, expected, (b, w), label)
    print(f"\nratios to plain uvicorn measured beside each (load after: {load_average()}):")
    ratios = {}
    for label in results:
        lv, plain = results[label]["levels"], plains[label]["levels"]
        ratios[label] = {key: {"throughput": lv[key]["images_per_s"] / plain[key]["images_per_s"],
                               "p50": lv[key]["p50_ms"] / plain[key]["p50_ms"],
                               "p99": lv[key]["p99_ms"] / plain[key]["p99_ms"],
                               "cpu": lv[key]["server_cpu_ms_per_req"] / max(1e-9, plain[key]["server_cpu_ms_per_req"])}
                         for key in lv}
        print(f"  {label:16s} " + "  ".join(f"{k}: {r['throughput']:.2f}x thr, p50 {r['p50']:.2f}x, "
                                            f"p99 {r['p99']:.2f}x" for k, r in ratios[label].items()))
        print(f"  {label:16s} {verdicts(ratios[label])}")
    results = {**results, **{f"plain beside {k}": v for k, v in plains.items()}}
    if args.json:
        print(json.dumps({"results": results, "ratios": ratios, "cpus": os.cpu_count(), "replicas": args.replicas}))


if __name__ == "__main__":
    main()
