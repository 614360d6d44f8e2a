"""What a request meets while `dundi serve` starts: from the moment the port accepts
connections, one single-image inference request every 100 ms (each on its own connection,
none waiting for another), until 2 s after the first 200. Prints, per mode, when the port
opened and the model first answered (seconds after the command started), every status seen
before that, and the longest any request was held before its answer: the bound on the hold.

    python bench/serve_startup.py [--run RUN] [--modes plain proxy haproxy]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, load_average, requests_for, small_run, start, stop  # noqa: E402
from serve_overload import read_head_and_body  # noqa: E402


async def probe(port: int, request: bytes, t_start: float, limit_s: float = 300.0) -> dict:
    answers: list[tuple[float, object, float]] = []  # (sent at, status, held for)
    opened = first_ok = None

    async def one(sent: float) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        try:
            writer.write(request)
            status, _ = await asyncio.wait_for(read_head_and_body(reader), 120)
        except Exception as exc:
            status = type(exc).__name__
        finally:
            writer.close()
        answers.append((sent - t_start, status, time.perf_counter() - sent))

    tasks = []
    while time.perf_counter() - t_start < limit_s:
        now = time.perf_counter()
        if opened is None:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                opened = now - t_start
            except OSError:
                await asyncio.sleep(0.05)
                continue
        tasks.append(asyncio.ensure_future(one(now)))
        if first_ok is None:
            done = [a for a in answers if a[1] == 200]
            first_ok = min(a[0] + a[2] for a in done) if done else None
        elif now - t_start > first_ok + 2:
            break
        await asyncio.sleep(0.1)
    await asyncio.gather(*tasks)
    before = [a for a in answers if first_ok is None or a[0] + a[2] <= first_ok + 1e-9 or a[1] != 200]
    return {"port_open_s": opened, "first_200_s": first_ok, "sent": len(answers),
            "statuses": sorted({str(a[1]) for a in answers}),
            "statuses_before_first_200": sorted({str(a[1]) for a in before if a[1] != 200}),
            "longest_hold_s": max((a[2] for a in answers), default=None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--modes", nargs="+", default=["plain", "proxy", "haproxy"],
                   choices=["plain", "proxy", "direct", "haproxy"])
    args = p.parse_args()
    args.replicas, args.niceness, args.throughput_optimized = 1, 0, False
    args.serve_args = ["--abstain-threshold", "none"]

    import numpy as np

    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else small_run(Path(tmp.name) / "dundi", args.data_dir)
    image = np.full((1, 1, 28, 28), 0.5, np.float32)
    rows = {}
    for kind in args.modes:
        port = free_port()
        request = requests_for(image, np.zeros(1, int), port, 1, count=1)[0][0]
        t0 = time.perf_counter()
        proc = start(kind, run, port, args)
        try:
            rows[kind] = asyncio.run(probe(port, request, t0))
        finally:
            stop(proc)
        r = rows[kind]
        print(f"{kind:8s} port open at {r['port_open_s']} s, first 200 at {r['first_200_s']} s; statuses before: "
              f"{r['statuses_before_first_200']}; longest hold {r['longest_hold_s']:.2f} s; {r['sent']} requests "
              f"(load {load_average()})", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
