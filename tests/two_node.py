"""Run a piece of Python against a real 2-node Ray cluster (``ray.cluster_utils.Cluster``, one
CPU per node) in a subprocess, so that it never meets the test session's local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PRELUDE = """\
import json, sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
"""
EPILOGUE = """\
    print("RESULT " + json.dumps(result))
finally:
    import ray
    ray.shutdown()
    cluster.shutdown()
"""


def on_two_nodes(body: str, *args: str, timeout: float = 600) -> dict:
    """Runs ``body`` (Python that sees ``cluster`` and ``sys.argv[1:] == args`` and sets
    ``result`` to something JSON can write) and returns ``result``; fails the test with the
    subprocess's stderr if it does not finish."""
    script = PRELUDE + textwrap.indent(textwrap.dedent(body), "    ") + EPILOGUE
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])
