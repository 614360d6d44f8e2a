"""Overload: open-loop traffic at 4x the sustainable rate for 30 s, plain uvicorn and Serve.

For each server (``dundi serve --no-ray`` and ``dundi serve --ingress MODE``), in one run:

1. **sustainable rate**: closed loop, 32 clients, one image per request (bench/serve.py's
   client) — the requests/s the server completes when it is never idle;
2. **overload**: open loop (requests sent on a fixed schedule whatever the answers, as real
   users do) at ``--factor`` (4) times that rate for ``--seconds`` (30) s. Every request must
   get 200, or 503 with ``Retry-After`` (``max_pending`` reached): the bench prints how many
   got each, the slowest answer (the bound on the wait; latency counts from the scheduled send
   time, so a lagging client does not hide queueing), the answered throughput as a ratio to
   the sustainable rate, and the server's memory (resident set of its whole process tree)
   before and at its peak, and the share of a core each of its processes used meanwhile
   (where the CPU goes: the model, the HTTP server, HAProxy, Serve's actors);
3. **recovery**: at once, open loop at half the sustainable rate for 5 s: the share answered
   200 in its first second and overall.

Traffic goes to 127.0.0.1 only; every loop is bounded in count and time. The machine's load
average is printed beside the figures. By default the load generator shares the machine's
cores with the server, so at 4x it takes CPU the server needs to answer (on 2 cores it is
most of what limits the answered throughput); ``--service-cpus 0 --client-cpus 1`` puts them
on separate cores, as clients elsewhere would be, and then the figures measure the server.

    python bench/serve_overload.py [--run RUN] [--modes haproxy] [--seconds 30] [--factor 4]
                                   [--service-cpus 0 --client-cpus 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import (  # noqa: E402
    cpu_seconds,
    free_port,
    load,
    load_average,
    requests_for,
    small_run,
    start,
    stop,
    tree_pids,
    wait_ready,
)

MAX_CONNECTIONS = 1000  # open connections of the load generator at most (file descriptors)


async def read_head_and_body(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = b""
        while True:  # chunked
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += (await reader.readexactly(size + 2))[:size]
            if size == 0:
                break
    return int(lines[0].split(" ", 2)[1]), headers, body


def refusal_code(body: bytes) -> str:
    """Who refused: the JSON error code of a 503 (``overloaded``: a replica or the plain server
    at max_pending; ``unavailable``: HAProxy, its queue full or no replica ready)."""
    try:
        return str(json.loads(body).get("code"))
    except (ValueError, AttributeError):
        return "not JSON"


async def open_loop(port: int, reqs: list, rate: float, seconds: float, timeout: float = 30.0) -> dict:
    """Send ``rate * seconds`` requests on schedule; each on an idle kept-alive connection or
    a new one. Returns per-request (status, latency from the scheduled time, Retry-After); a
    503's status names its code ("503 overloaded")."""
    idle: list = []
    out: list[tuple] = []
    skipped = 0
    busy = 0

    async def exchange(i: int, held: list):
        """One request on ``held[0]`` (a kept-alive connection, or None) or a new connection,
        which replaces it in ``held`` so that the caller closes it whatever happens."""
        if held[0] is not None:  # a kept-alive connection the server may have closed meanwhile
            try:
                held[0][1].write(reqs[i % len(reqs)][0])
                return await read_head_and_body(held[0][0])
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise  # an answer had begun: a real failure
                held[0][1].close()  # closed before any answer (idle timeout): resend on a new one,
                held[0] = None      # as HTTP clients do with a stale pooled connection
        held[0] = await asyncio.open_connection("127.0.0.1", port)
        held[0][1].write(reqs[i % len(reqs)][0])
        return await read_head_and_body(held[0][0])

    async def one(i: int, due: float) -> None:
        nonlocal busy
        busy += 1
        held = [idle.pop() if idle else None]
        try:
            status, headers, body = await asyncio.wait_for(exchange(i, held), timeout)  # connect included
            conn = held[0]
            out.append((status if status != 503 else f"503 {refusal_code(body)}", time.perf_counter() - due,
                        headers.get("retry-after")))
            if headers.get("connection", "").lower() == "close":
                conn[1].close()
            else:
                idle.append(conn)
        except Exception as exc:  # asyncio.TimeoutError: no answer within ``timeout``
            out.append((type(exc).__name__, time.perf_counter() - due, None))
            if held[0] is not None:
                held[0][1].close()
        finally:
            busy -= 1

    tasks = []
    t0 = time.perf_counter()
    for i in range(int(rate * seconds)):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if busy >= MAX_CONNECTIONS:
            skipped += 1
            continue
        tasks.append(asyncio.ensure_future(one(i, due)))
    await asyncio.gather(*tasks)  # each ends within ``timeout``
    for _, writer in idle:
        writer.close()
    return {"results": out, "skipped": skipped, "elapsed": time.perf_counter() - t0}


def tree_rss_mb(root: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total / 2**20


def tree_cpu_s(root: int) -> dict[str, float]:
    """CPU seconds used so far by each process of the tree, keyed by ``name[pid]`` (Ray names
    its workers after the actor they host, e.g. ``ray::ServeReplica``)."""
    out = {}
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                words = f.read().split(b"\0")
        except OSError:
            continue
        name = os.path.basename(words[0].decode(errors="replace")) or "?"
        if name.startswith("python") and len(words) > 1:  # the plain server: python -m dundi ...
            name = "python " + " ".join(w.decode(errors="replace") for w in words[1:3])
        out[f"{name[:40]}[{pid}]"] = cpu_seconds(pid)
    return out


def cpu_shares(before: dict[str, float], after: dict[str, float], seconds: float, top: int = 5) -> dict[str, float]:
    """The share of one core each process used between two :func:`tree_cpu_s` samples, the
    ``top`` largest (the rest summed as ``others``)."""
    shares = sorted(((k, (v - before.get(k, 0.0)) / seconds) for k, v in after.items()), key=lambda kv: -kv[1])
    out = {k: round(v, 3) for k, v in shares[:top]}
    out["others"] = round(sum(v for _, v in shares[top:]), 3)
    return out


async def with_samples(root: int, coro, window_s: float) -> tuple[dict, float, dict[str, float]]:
    """Run ``coro`` while sampling the server's memory every 0.5 s; (its result, peak MB, the
    share of a core each server process used over the first ``window_s`` seconds: the time the
    load is offered, not the tail spent waiting for the last answers)."""
    peak, t0, cpu0, shares = 0.0, time.perf_counter(), tree_cpu_s(root), {}
    task = asyncio.ensure_future(coro)
    while not task.done():
        peak = max(peak, tree_rss_mb(root))
        if not shares and time.perf_counter() - t0 >= window_s:
            shares = cpu_shares(cpu0, tree_cpu_s(root), time.perf_counter() - t0)
        await asyncio.wait([task], timeout=0.5)
    return task.result(), peak, shares or cpu_shares(cpu0, tree_cpu_s(root), time.perf_counter() - t0)


def summarize(phase: dict, seconds: float) -> dict:
    rows = phase["results"]
    statuses: dict = {}
    for status, _, _ in rows:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    lat = np.array([t for _, t, _ in rows]) * 1000 if rows else np.array([np.nan])
    ok = [t for s, t, _ in rows if s == 200]
    refused = [(t, ra) for s, t, ra in rows if str(s).startswith("503")]
    return {"sent": len(rows), "skipped": phase["skipped"], "statuses": statuses,
            "ok_per_s": len(ok) / seconds, "503_without_retry_after": sum(ra is None for _, ra in refused),
            "max_ms": float(lat.max()), "p99_ms": float(np.percentile(lat, 99)),
            "ok_p99_ms": float(np.percentile(np.array(ok) * 1000, 99)) if ok else None,
            "refused_p99_ms": float(np.percentile([t * 1000 for t, _ in refused], 99)) if refused else None}


def overload(kind: str, run: Path, args: argparse.Namespace, images, expected) -> dict:
    port = free_port()
    proc = start(kind, run, port, args)
    try:
        wait_ready(port, proc)
        one = requests_for(images, expected, port, 1)
        cpu0, t0 = tree_cpu_s(proc.pid), time.perf_counter()
        closed = asyncio.run(load(port, one, 32, args.measure, 1.0))
        cpu_sustained = cpu_shares(cpu0, tree_cpu_s(proc.pid), time.perf_counter() - t0)  # warm-up second included
        rate = closed["rps"]  # answered (200) requests/s
        if closed["errors"]:
            print(f"{kind:8s} WARNING: {closed['errors']} of the closed loop's requests were not answered 200 "
                  f"(a --max-pending below its 32 clients refuses some): the sustainable rate counts the 200s only",
                  flush=True)
        rss0 = tree_rss_mb(proc.pid)
        phase, peak, cpu = asyncio.run(with_samples(proc.pid, open_loop(port, one, args.factor * rate, args.seconds),
                                                    args.seconds))
        over = summarize(phase, args.seconds)
        after = asyncio.run(open_loop(port, one, rate / 2, 5.0))
        first = [s for s, t, _ in after["results"][: max(1, int(rate / 2))]]
        rec = summarize(after, 5.0)
        row = {"sustainable_rps": rate, "overload": over, "answered_ratio": over["ok_per_s"] / rate,
               "rss_mb_before": rss0, "rss_mb_peak": peak, "recovery": rec, "sustained_cpu_share": cpu_sustained,
               "overload_cpu_share": cpu,
               "recovery_first_second_ok": sum(s == 200 for s in first) / len(first), "load": load_average()}
        print(f"{kind:8s} sustainable {rate:6.0f} req/s; at {args.factor:g}x for {args.seconds:g} s: "
              f"sent {over['sent']} (skipped {over['skipped']}), statuses {over['statuses']}, 503 without "
              f"Retry-After {over['503_without_retry_after']}; slowest answer {over['max_ms']:.0f} ms "
              f"(p99 {over['p99_ms']:.0f} ms; 200s p99 {over['ok_p99_ms']} ms, 503s p99 {over['refused_p99_ms']} ms); "
              f"answered {over['ok_per_s']:.0f} req/s = {row['answered_ratio']:.2f}x sustainable "
              f"(target >= 0.9x {'met' if row['answered_ratio'] >= 0.9 else 'MISSED'}); memory {rss0:.0f} -> peak "
              f"{peak:.0f} MB; recovery: first second {100 * row['recovery_first_second_ok']:.0f}% 200, "
              f"5 s {rec['statuses']} p99 {rec['p99_ms']:.0f} ms  (load {row['load']})\n"
              f"{'':8s} share of a core at the sustainable rate: {cpu_sustained}\n"
              f"{'':8s} share of a core during the overload: {cpu}", flush=True)
        return row
    finally:
        stop(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--modes", nargs="+", default=["haproxy"], choices=["proxy", "direct", "haproxy"])
    p.add_argument("--seconds", type=float, default=30.0, help="length of the overload")
    p.add_argument("--factor", type=float, default=4.0, help="overload rate / sustainable rate")
    p.add_argument("--measure", type=float, default=5.0, help="seconds measuring the sustainable rate")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--niceness", type=int, default=0)
    p.add_argument("--service-cpus", type=int, nargs="+", default=None,
                   help="cores the server (and the Ray it starts) runs on, e.g. 0")
    p.add_argument("--client-cpus", type=int, nargs="+", default=None,
                   help="cores this load generator runs on, e.g. 1: apart from the server's, as real clients are")
    p.add_argument("--max-pending", type=int, default=None,
                   help="dundi serve --max-pending for every server (default: the service's own)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)
    args.throughput_optimized = False
    args.serve_args = ["--abstain-threshold", "none", *(["--max-pending", str(args.max_pending)] if args.max_pending else [])]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench/serve_overload.py: stopped by SIGTERM"))

    from dundi.data import load_split
    from dundi.run.directory import Run

    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else small_run(Path(tmp.name) / "dundi", args.data_dir)
    images, _, _ = load_split(Run.load(run).meta["dataset"], "test", args.data_dir, limit=64)
    expected = Run.load(run).classify(images).labels
    print(f"load before: {load_average()} (cpus={os.cpu_count()}; server on {args.service_cpus or 'all'}, "
          f"load generator on {args.client_cpus or 'all'})", flush=True)
    rows = {kind: overload(kind, run, args, images, expected) for kind in ("plain", *args.modes)}
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
