"""What certificates cost over HTTP: one certified run served three ways, measured in one run.

* **no certificate** — ``dundi serve RUN --no-certificates`` (the reference),
* **certify_eps** — ``--certify-eps EPS``: each answer proved at one radius (one interval pass),
* **full radius** — the default: each answer's certified radius (a search of interval passes),

each a ``dundi serve`` process of the same kind (``--kind plain``: one uvicorn process, the
default; ``--kind haproxy``: Ray Serve behind HAProxy), all three started before measuring and
then driven level by level in rotating order, so a drifting load hits them alike. Closed loop
(bench/serve.py's client): single images at 1 client, 16-image requests at 8 clients.
requests/s, images/s, p50 and p99, and the ratios to the no-certificate server are printed,
with the machine's load. Every answer's label is checked against ``Run.classify``.

    python bench/serve_certified.py --run RUN [--eps 0.3] [--kind plain|haproxy] [--duration 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/serve.py's client and helpers

from serve import _level, free_port, load_average, start, stop, wait_ready  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run trained with --certified, with its index")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--kind", choices=("plain", "haproxy"), default="plain")
    p.add_argument("--duration", type=float, default=6.0, help="seconds measured per level")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    args.replicas, args.niceness, args.throughput_optimized = 1, 0, False

    from dundi.data import load_split
    from dundi.run.directory import Run

    run = Run.load(args.run)
    if not run.oracle.answers_exactly(run.oracle.resolve()):
        sys.exit(f"bench/serve_certified.py: {args.run} is not a certified run (train it with --certified)")
    images, _, _ = load_split(run.meta["dataset"], "test", args.data_dir, limit=256)
    expected = run.classify(images).labels
    modes = {"no certificate": ["--no-certificates"], f"certify_eps {args.eps:g}": ["--certify-eps", str(args.eps)],
             "full radius": []}
    ports, procs = {}, {}
    try:
        for name, extra in modes.items():
            args.serve_args = ["--abstain-threshold", "none", *extra]
            ports[name] = free_port()
            procs[name] = start(args.kind, Path(args.run), ports[name], args)
        for name in modes:
            wait_ready(ports[name], procs[name])
        print(f"{args.kind} servers of {args.run}, load before {load_average()}", flush=True)
        rows: dict[str, dict] = {name: {} for name in modes}
        for i, (size, clients) in enumerate(((1, 1), (16, 8))):
            names = list(modes)
            for name in names[i % 3:] + names[:i % 3]:
                rows[name][f"{size}x{clients}"] = _level(ports[name], procs[name], size, clients, images,
                                                         expected, args, name[:16])
    finally:
        for proc in procs.values():
            stop(proc)
    base = rows["no certificate"]
    print(f"\nratios to the server without certificates (load after {load_average()}):")
    for name, levels in rows.items():
        print(f"  {name:18s} " + "  ".join(
            f"{key}: {levels[key]['images_per_s'] / base[key]['images_per_s']:.2f}x images/s, "
            f"p50 {levels[key]['p50_ms'] / base[key]['p50_ms']:.2f}x" for key in levels))


if __name__ == "__main__":
    main()
