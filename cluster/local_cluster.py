#!/usr/bin/env python
"""Start and stop a local multi-node Ray cluster on one machine: a head and N worker nodes.

For trying DunDi's cluster path (``--address``, ``dundi submit``) without a cloud. Each node
is a ``ray start --block`` process in its own session with its own ports, so ``down`` stops
exactly the nodes ``up`` started (never ``ray stop``, which would kill every Ray on the
machine, other people's included).

    python cluster/local_cluster.py up [--workers 2] [--cpus-per-node 1] [--head-cpus 1]
    python cluster/local_cluster.py status
    python cluster/local_cluster.py down

``up`` prints the addresses: the GCS address for ``dundi train --address`` and the dashboard
address for ``dundi submit --address`` (and ``ray job submit``). State and logs live in
``--state-dir`` (default ``$DUNDI_CLUSTER_DIR`` or ``/tmp/dundi-cluster-$USER``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STATE_FILE = "cluster.json"


def default_state_dir() -> Path:
    user = os.environ.get("USER") or str(os.getuid())
    return Path(os.environ.get("DUNDI_CLUSTER_DIR") or f"/tmp/dundi-cluster-{user}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def ray_cli() -> list[str]:
    """The `ray` of this interpreter's environment (so nodes run the same Ray and DunDi)."""
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ray")
    if not found:
        sys.exit("local_cluster: the `ray` command is not installed (pip install 'ray[default]')")
    return [found]


def node_ports(worker_port_base: int) -> list[str]:
    """Ports that must differ between raylets sharing one machine."""
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--min-worker-port", str(worker_port_base), "--max-worker-port", str(worker_port_base + 999)]


def load_state(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def count_alive_nodes(gcs: str, auth: str) -> int:
    """Alive nodes as the GCS sees them (a short-lived Ray driver connection)."""
    code = ("import ray; ray.init(address=%r, log_to_driver=False, logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))" % gcs)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "RAY_AUTH_MODE": auth})
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return -1


def start_node(cmd: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    log = open(log_path, "ab")
    # A new session: the node survives this script, and `down` can signal its whole group.
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)


def up(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    state = load_state(state_dir)
    if state and any(alive(n["pid"]) for n in state["nodes"]):
        print(f"a local cluster is already running (state in {state_dir}); "
              f"`{Path(__file__).name} down` first", file=sys.stderr)
        return 1
    state_dir.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    dash_port = args.dashboard_port or free_port()
    if port_open("127.0.0.1", port) or port_open("127.0.0.1", dash_port):
        print(f"port {port} or {dash_port} is in use: pass --port/--dashboard-port", file=sys.stderr)
        return 1
    host = "127.0.0.1"
    gcs = f"{host}:{port}"
    # Ray puts Unix sockets under its temp dir and their paths must stay under 108 bytes.
    digest = hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:8]
    temp_dir = str(Path(args.temp_dir or f"/tmp/ray-dundi-{digest}").resolve())
    if len(temp_dir) > 40:
        print(f"--temp-dir {temp_dir} is too long for Ray's socket paths (keep it under 40 "
              f"characters)", file=sys.stderr)
        return 1
    env = dict(os.environ)
    # Jobs run `python`: make it this interpreter, which has DunDi and Ray installed.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # One authentication mode for every node (Ray 2.5x+ refuses nodes that disagree). With
    # "token", every client needs RAY_AUTH_MODE=token and this user's ~/.ray/auth_token;
    # `dundi` sets the mode itself for clusters on this machine.
    env["RAY_AUTH_MODE"] = args.auth
    if args.auth == "token":
        subprocess.run([*ray_cli(), "get-auth-token", "--generate"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    common = ["--block", "--disable-usage-stats", "--node-ip-address", host,
              "--object-store-memory", str(args.object_store_mb * 1024 * 1024)]
    head = [*ray_cli(), "start", "--head", "--port", str(port), "--num-cpus", str(args.head_cpus),
            "--num-gpus", "0", "--include-dashboard", "true", "--dashboard-host", host,
            "--dashboard-port", str(dash_port), "--ray-client-server-port", str(free_port()),
            "--temp-dir", temp_dir,
            *node_ports(20000), *common]
    nodes = []
    proc = start_node(head, state_dir / "head.log", env)
    nodes.append({"role": "head", "pid": proc.pid, "cpus": args.head_cpus})
    state = {"gcs_address": gcs, "dashboard": f"http://{host}:{dash_port}", "nodes": nodes,
             "state_dir": str(state_dir), "temp_dir": temp_dir, "auth": args.auth}
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    deadline = time.monotonic() + args.timeout
    while not port_open(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            print(f"the head node did not start; see {state_dir / 'head.log'}", file=sys.stderr)
            down(args)
            return 1
        time.sleep(0.5)
    # Worker nodes need the head registered in the GCS, which comes a little after its port.
    while count_alive_nodes(gcs, args.auth) < 1:
        if proc.poll() is not None or time.monotonic() > deadline:
            print(f"the head node did not register; see {state_dir / 'head.log'}", file=sys.stderr)
            down(args)
            return 1
        time.sleep(0.5)
    for i in range(args.workers):
        cmd = [*ray_cli(), "start", "--address", gcs, "--num-cpus", str(args.cpus_per_node),
               "--num-gpus", "0", *node_ports(21000 + 1000 * i), *common]
        proc = start_node(cmd, state_dir / f"worker-{i}.log", env)
        nodes.append({"role": f"worker-{i}", "pid": proc.pid, "cpus": args.cpus_per_node})
        (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    want = 1 + args.workers
    while (n := count_alive_nodes(gcs, args.auth)) < want:
        dead = [x["role"] for x in nodes if not alive(x["pid"])]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"only {n} of {want} nodes after {args.timeout}s"
            print(f"the cluster did not come up ({why}); logs in {state_dir}", file=sys.stderr)
            down(args)
            return 1
        time.sleep(1.0)
    while True:  # the Jobs API answers a little after the GCS
        try:
            urllib.request.urlopen(f"{state['dashboard']}/api/version", timeout=2).close()
            break
        except urllib.error.HTTPError:  # it answers (401 without a token): it is up
            break
        except OSError:
            if time.monotonic() > deadline:
                print(f"the dashboard at {state['dashboard']} does not answer; see {state_dir}",
                      file=sys.stderr)
                down(args)
                return 1
            time.sleep(1.0)
    print(json.dumps(state) if args.json else
          f"local Ray cluster up: head + {args.workers} worker node(s), "
          f"{args.head_cpus + args.workers * args.cpus_per_node} CPUs\n"
          f"  train on it:   dundi train ... --workers {min(want, 2)} --address {gcs}\n"
          f"  submit jobs:   dundi submit --address {state['dashboard']} -- train ...\n"
          f"  dashboard:     {state['dashboard']}\n" +
          ("  other clients: export RAY_AUTH_MODE=token (token in ~/.ray/auth_token)\n"
           if args.auth == "token" else "") +
          f"  stop it:       python {sys.argv[0]} down" +
          (f" --state-dir {state_dir}" if Path(args.state_dir) != default_state_dir() else ""))
    return 0


def down(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    state = load_state(state_dir)
    if state is None:
        print(f"no local cluster recorded in {state_dir}")
        return 0
    # Workers first, then the head; SIGTERM lets each `ray start --block` stop its processes.
    for node in reversed(state["nodes"]):
        if alive(node["pid"]):
            try:
                os.killpg(node["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + getattr(args, "grace", 10.0)
    while any(alive(n["pid"]) for n in state["nodes"]) and time.monotonic() < deadline:
        time.sleep(0.3)
    for node in state["nodes"]:  # whatever ignored SIGTERM
        try:
            os.killpg(node["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    print(f"local Ray cluster stopped ({len(state['nodes'])} node(s))")
    return 0


def status(args: argparse.Namespace) -> int:
    state = load_state(Path(args.state_dir))
    if state is None:
        print("no local cluster running")
        return 1
    for node in state["nodes"]:
        node["alive"] = alive(node["pid"])
    if args.json:
        print(json.dumps(state))
    else:
        print(f"GCS {state['gcs_address']}, dashboard {state['dashboard']}")
        for node in state["nodes"]:
            print(f"  {node['role']:<10} pid {node['pid']:<8} cpus {node['cpus']:<4} "
                  f"{'alive' if node['alive'] else 'DEAD'}")
    return 0 if all(n["alive"] for n in state["nodes"]) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="start a head and N worker nodes")
    p.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
    p.add_argument("--cpus-per-node", type=int, default=1, help="logical CPUs of each worker node")
    p.add_argument("--head-cpus", type=int, default=1, help="logical CPUs of the head node")
    p.add_argument("--port", type=int, default=None, help="GCS port (default: a free port)")
    p.add_argument("--dashboard-port", type=int, default=None, help="dashboard / Jobs API port")
    p.add_argument("--object-store-mb", type=int, default=512, help="object store per node")
    p.add_argument("--temp-dir", default=None,
                   help="Ray's temp dir, sessions and logs (default /tmp/ray-dundi-<hash of state dir>)")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--auth", choices=("token", "disabled"),
                   default=os.environ.get("RAY_AUTH_MODE", "token"),
                   help="Ray token authentication (default: token, from ~/.ray/auth_token)")
    p.set_defaults(fn=up)
    p = sub.add_parser("down", help="stop the nodes that `up` started")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds the nodes get to drain before they are killed")
    p.set_defaults(fn=down)
    p = sub.add_parser("status", help="show the nodes and whether they are alive")
    p.set_defaults(fn=status)
    for p in sub.choices.values():
        p.add_argument("--state-dir", default=str(default_state_dir()))
        p.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
