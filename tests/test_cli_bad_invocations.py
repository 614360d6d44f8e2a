"""Every mistake on the command line gets one line on stderr, exit code 2 and no traceback,
through the real console script (`.venv/bin/dundi`), across every verb.

Each invocation here fails in argument validation, before any model, dataset or Ray is
touched, so the whole list costs little more than starting Python once per line; they run
in sequence in this one test process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DUNDI = Path(sys.executable).with_name("dundi")  # the console script installed beside python

RUN = "runs/does-not-matter"  # never opened: each line fails before a run is read

# (arguments, a fragment the one error line must contain: the flag or value at fault)
BAD = [
    ([], "COMMAND"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["--bogus"], "COMMAND"),
    (["data"], "ACTION"),
    (["data", "fetch"], "dataset"),
    (["data", "fetch", "imagenet"], "invalid choice: 'imagenet'"),
    (["data", "info", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--epochs", "0"], "--epochs: 0 is out of range"),
    (["train", "--epochs", "x"], "--epochs: 'x' is not an integer"),
    (["train", "--batch-size", "-1"], "--batch-size"),
    (["train", "--lr", "0"], "--lr: 0 is out of range"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--tuples", "0"], "--tuples"),
    (["train", "--loss", "hinge"], "--loss: invalid choice: 'hinge'"),
    (["train", "--mining", "hardest"], "--mining: invalid choice"),
    (["train", "--metric", "cosine"], "--metric: invalid choice"),
    (["train", "--dataset", "imagenet"], "--dataset: invalid choice"),
    (["train", "--cert-eps", "1.5"], "--cert-eps: 1.5 is out of range: give a number in (0, 1]"),
    (["train", "--adv-eps", "0"], "--adv-eps"),
    (["train", "--adv-mix", "2"], "--adv-mix: 2 is out of range: give a number in [0, 1]"),
    (["train", "--workers", "-1"], "--workers"),
    (["train", "--limit", "0"], "--limit"),
    (["train", "--embed-dim", "0"], "--embed-dim"),
    (["train-native", "--model", "resnet"], "invalid choice: 'resnet'"),
    (["train-native", "--pretrained", RUN], "unrecognized arguments: --pretrained"),
    (["train-native", "--adv-steps", "0"], "--adv-steps"),
    (["index"], "ACTION"),
    (["index", "build"], "run"),
    (["index", "build", RUN, "--oracles", "0"], "--oracles"),
    (["classify"], "run"),
    (["classify", RUN, "--limit", "0"], "--limit: 0 is out of range: give an integer of at least 1"),
    (["classify", RUN, "--n", "0"], "--n"),
    (["classify", RUN, "--k", "-3"], "--k"),
    (["classify", RUN, "--split", "validation"], "--split: invalid choice: 'validation'"),
    (["classify", RUN, "a.png", "--format", "xml"], "--format: invalid choice: 'xml'"),
    (["classify", RUN, "a.png", "--abstain-threshold", "-1"], "--abstain-threshold"),
    (["classify", RUN, "a.png", "--false-abstain", "1"], "--false-abstain: 1 is out of range"),
    (["index", "calibrate", RUN, "--false-abstain", "0"], "--false-abstain: 0 is out of range"),
    (["index", "calibrate", RUN, "--limit", "0"], "--limit"),
    (["serve", RUN, "--abstain-threshold", "sometimes"], "--abstain-threshold"),
    (["certify", RUN, "--eps", "1.5"], "--eps: 1.5 is out of range"),
    (["certify", RUN, "--eps", "0"], "--eps: 0 is out of range"),
    (["certify", RUN, "--eps"], "--eps: expected at least one argument"),
    (["evaluate", RUN], "--out"),
    (["evaluate", RUN, "--out", "o", "--steps", "-1"], "--steps: -1 is out of range"),
    (["evaluate", RUN, "--out", "o", "--steps", "0"], "--steps: 0 is out of range"),
    (["evaluate", RUN, "--out", "o", "--eps", "-0.1"], "--eps"),
    (["evaluate", RUN, "--out", "o", "--limit", "0"], "--limit"),
    (["evaluate", RUN, "--out", "o", "--shard-size", "0"], "--shard-size"),
    (["evaluate", RUN, "--out", "o", "--workers", "-2"], "--workers"),
    (["evaluate", RUN, "--out", "o", "--temperature", "0"], "--temperature"),
    (["report"], "results"),
    (["report", "some-eval"], "--out"),
    (["serve"], "run"),
    (["serve", RUN, "--autoscale", "4:1"], "--autoscale"),
    (["serve", RUN, "--ingress", "nginx"], "--ingress: invalid choice: 'nginx'"),
    (["serve", RUN, "--replicas", "2", "--autoscale", "1:2"], "not allowed with argument"),
    (["serve", RUN, "--port", "http"], "--port"),
    (["submit", "--num-cpus", "-1", "train"], "--num-cpus"),
    (["jobs"], "ACTION"),
    (["jobs", "status"], "job_id"),
    (["jobs", "stop", "some-job", "--timeout", "0"], "--timeout"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
]


def test_bad_invocations_are_one_line_exit_2_no_traceback(tmp_path):
    assert DUNDI.exists(), f"{DUNDI} is missing: install the project (make setup)"
    assert len(BAD) >= 40
    verbs = {args[0] for args, _ in BAD if args and not args[0].startswith("-")}
    assert {"data", "train", "train-native", "index", "classify", "certify", "evaluate", "report",
            "serve", "submit", "jobs", "demo"} <= verbs
    failures = []
    for args, fragment in BAD:
        proc = subprocess.run([str(DUNDI), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        lines = proc.stderr.splitlines()
        ok = (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dundi: error: ")
              and fragment in lines[0] and "Traceback" not in proc.stderr and not proc.stdout)
        if not ok:
            failures.append((args, proc.returncode, proc.stderr[-600:], proc.stdout[-200:]))
    assert not failures, "\n".join(map(repr, failures))


@pytest.mark.parametrize("args", [["--version"], ["classify", "--help"]])
def test_version_and_help_exit_0_on_stdout(args):
    proc = subprocess.run([str(DUNDI), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout and not proc.stderr


@pytest.mark.parametrize("content, fragment", [(b'{"fingerprint": "ab", "plan": [', "is damaged (not JSON"),
                                               (b"\xff\xfe", "is damaged (not JSON"),
                                               (b'["a list"]', "is damaged (no fingerprint, plan, shards)"),
                                               (b'{"fingerprint": "ab"}', "is damaged (no plan, shards)")])
def test_a_damaged_evaluation_file_is_one_line(tmp_path, content, fragment):
    """An evaluation directory whose evaluation.json was cut short or is not ours: `dundi
    report` (and `dundi evaluate` into it) say so in one line, naming the file and the way out."""
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "evaluation.json").write_bytes(content)
    proc = subprocess.run([str(DUNDI), "report", "ev", "--out", "rep"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert fragment in lines[0] and "evaluation.json" in lines[0] and "move ev aside" in lines[0], lines[0]
