"""Ray Jobs: `dundi submit` / `dundi jobs ...` against a real local multi-node cluster started
by cluster/local_cluster.py (a head and one worker node, one CPU each), plus the command
preparation and error paths that need no cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dundi.errors import DundiError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_cluster.py"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-node local cluster for this module; always stopped afterwards (~30-60 s to start)."""
    state = tmp_path_factory.mktemp("cluster")
    up = subprocess.run([sys.executable, str(SCRIPT), "up", "--workers", "1", "--cpus-per-node", "1",
                         "--head-cpus", "1", "--object-store-mb", "256", "--state-dir", str(state),
                         "--json"], capture_output=True, text=True, timeout=300)
    info: dict = {}
    try:
        assert up.returncode == 0, up.stderr[-3000:] + up.stdout[-2000:]
        info = json.loads(up.stdout.strip().splitlines()[-1])
        yield info
    finally:
        subprocess.run([sys.executable, str(SCRIPT), "down", "--state-dir", str(state), "--grace", "5"],
                       capture_output=True, text=True, timeout=120)
        if info.get("temp_dir", "").startswith("/tmp/ray-dundi-"):
            shutil.rmtree(info["temp_dir"], ignore_errors=True)  # Ray's session logs


@pytest.mark.ray
@pytest.mark.realdata
@pytest.mark.slow
def test_submitted_training_job_finishes_and_its_run_loads(cluster, tmp_path, data_dir, capsys):
    from dundi.cli.main import main
    from dundi.run.directory import Run

    out = tmp_path / "jobrun"
    code = main(["submit", "--address", cluster["dashboard"], "--follow", "--json", "--",
                 "train", "--dataset", "mnist-10k", "--epochs", "1", "--tuples", "2000",
                 "--workers", "2", "--oracles", "10", "--out", str(out), "--no-progress",
                 "--data-dir", data_dir])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    final = json.loads(printed.strip().splitlines()[-1])
    assert final["status"] == "SUCCEEDED" and final["job_id"]
    assert "jobs/train.py" in final["entrypoint"]
    run = Run.load(out)
    assert run.meta["kind"] == "dundi" and run.oracle is not None
    # The job's driver joined the cluster: one Ray Train worker on each of the two nodes.
    assert len({n["node"] for n in run.meta["ray"]["nodes"]}) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_jobs_status_logs_list_and_stop(cluster, tmp_path, data_dir):
    from dundi.distributed import jobs_api

    address = cluster["dashboard"]
    job_id = jobs_api.submit(["train", "--dataset", "mnist-10k", "--epochs", "100", "--tuples", "2000",
                              "--out", str(tmp_path / "long"), "--no-progress", "--data-dir", data_dir],
                             address)
    deadline = time.monotonic() + 120
    while (st := jobs_api.status(job_id, address))["status"] != "RUNNING":
        assert st["status"] == "PENDING" and time.monotonic() < deadline, st
        time.sleep(0.5)
    while "[dundi job" not in jobs_api.logs(job_id, address):  # the entrypoint has started
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert job_id in [row["job_id"] for row in jobs_api.list_jobs(address)]
    assert jobs_api.stop(job_id, address) is True
    assert jobs_api.wait(job_id, address, timeout=60)["status"] == "STOPPED"
    with pytest.raises(DundiError, match="does not exist"):
        jobs_api.status("no-such-job", address)


def test_unreachable_jobs_api_fails_fast():
    from dundi.distributed import jobs_api

    t0 = time.monotonic()
    with pytest.raises(DundiError, match="no Ray Jobs API answers at http://127.0.0.1:1"):
        jobs_api.client("127.0.0.1:1")
    with pytest.raises(DundiError, match="dashboard"):
        jobs_api.dashboard_address("ray://127.0.0.1:10001")
    assert time.monotonic() - t0 < 15


def test_bad_commands_are_refused_before_submission():
    from dundi.cli.main import build_parser
    from dundi.cli.submission import submit_command

    with pytest.raises(DundiError, match="not a valid command"):
        submit_command(["train", "--no-such-flag"], build_parser(), "http://127.0.0.1:1")
    with pytest.raises(DundiError, match="cannot itself be submitted"):
        submit_command(["submit", "train"], build_parser(), "http://127.0.0.1:1")
    with pytest.raises(DundiError, match="nothing to submit"):
        submit_command([], build_parser(), "http://127.0.0.1:1")


def test_paths_are_made_absolute_for_a_local_cluster(tmp_path, monkeypatch):
    from dundi.cli.main import build_parser
    from dundi.cli.submission import prepare_command
    from dundi.distributed.jobs_api import entrypoint_script

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "r5").mkdir(parents=True)
    argv = prepare_command(["train", "--out", "runs/x", "--data-dir=cache", "--storage", "s3://b/p"],
                           local=True, parser=build_parser())
    assert argv == ["train", "--out", str(tmp_path / "runs/x"), f"--data-dir={tmp_path / 'cache'}",
                    "--storage", "s3://b/p"]
    argv = prepare_command(["train-native", "--dataset", "mnist-10k"], local=True, parser=build_parser())
    assert argv[-2:] == ["--out", str(tmp_path / "runs" / "mnist-10k-lenet5-native")]
    assert prepare_command(["index", "build", "runs/r5"], local=True, parser=build_parser())[2] == str(tmp_path / "runs/r5")
    notes: list[str] = []
    argv = prepare_command(["train", "--out", "runs/x"], local=False, parser=build_parser(), warn=notes.append)
    assert argv == ["train", "--out", "runs/x"] and "relative" in notes[0]

    assert entrypoint_script(["train", "--epochs", "1"]) == ("jobs/train.py", ["--epochs", "1"])
    assert entrypoint_script(["train-native"]) == ("jobs/train_native.py", [])
    assert entrypoint_script(["index", "build", "r"]) == ("jobs/index_build.py", ["r"])
    assert entrypoint_script(["classify", "r"]) == ("jobs/run.py", ["classify", "r"])


def test_job_entrypoints_run_the_dundi_command():
    import py_compile

    scripts = sorted((ROOT / "jobs").glob("*.py"))
    assert {"train", "train_native", "index_build", "run"} <= {p.stem for p in scripts}
    for script in scripts:
        py_compile.compile(str(script), doraise=True)
    for argv in (["jobs/train.py", "--help"], ["jobs/run.py", "index", "build", "--help"]):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                              cwd=ROOT)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        assert proc.stdout.startswith("[dundi job") and "usage: dundi" in proc.stdout
