"""End to end on a real mnist-10k slice: training, index, classify, the CLI contract."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dundi.data import load_split
from dundi.rule.params import TwoStepRule
from dundi.rule.reference import OracleScorer
from dundi.run.directory import Run
from dundi.run.pipeline import classify_split
from dundi.training.config import TrainConfig
from dundi.training.passes import triplet_batch_loss

pytestmark = pytest.mark.realdata


def test_trained_runs_classify_real_digits(mnist_runs, data_dir):
    native = classify_split(mnist_runs["native"], data_dir=data_dir)
    dundi = classify_split(mnist_runs["dundi"], TwoStepRule(10, 3, 5), data_dir=data_dir)
    assert native["count"] == dundi["count"] == 2000
    # tiny budgets (a few seconds of training on 2,700 digits): both far above chance (10 %);
    # the demo test checks DunDi against native at a real budget
    assert native["accuracy"] > 0.8
    assert dundi["accuracy"] > 0.5


def test_adaptive_scorer_argmax_equals_two_step_on_real_run(mnist_runs, data_dir):
    run = Run.load(mnist_runs["dundi"])
    x, _, _ = load_split("mnist-10k", "test", data_dir, limit=300)
    two_step = run.classify(x, TwoStepRule(10, 3, 10)).labels
    scorer = OracleScorer(run.model, run.oracle_tensor()).eval()
    with torch.no_grad():
        scores = scorer(torch.from_numpy(x))
    np.testing.assert_array_equal(scores.argmax(1).numpy(), two_step)


def test_dedupe_and_paper_loop_give_the_same_loss(data_dir):
    from dundi.nets.models import build_distance_net
    from dundi.training.tuples import sample_tuples

    x, y, _ = load_split("mnist-10k", "train", data_dir, limit=500)
    model = build_distance_net("lenet1", (1, 28, 28)).eval()
    batch = sample_tuples(y, 64, seed=0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    fast, ok_fast = triplet_batch_loss(model, xt, yt, batch, TrainConfig(dedupe=True))
    slow, ok_slow = triplet_batch_loss(model, xt, yt, batch, TrainConfig(dedupe=False))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    assert ok_fast == ok_slow


def _dundi(*args):
    return subprocess.run([sys.executable, "-m", "dundi", *args], capture_output=True, text=True, timeout=600)


def test_cli_classify_json_last_line(mnist_runs, data_dir):
    out = _dundi("classify", str(mnist_runs["dundi"]), "--n", "10", "--m", "2", "--k", "3",
                 "--data-dir", data_dir, "--limit", "500", "--json")
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"accuracy", "n", "m", "k", "dataset", "split", "count"} <= figures.keys()
    assert figures["count"] == 500 and figures["n"] == 10 and figures["m"] == 2 and figures["k"] == 3
    direct = classify_split(mnist_runs["dundi"], TwoStepRule(10, 2, 3), data_dir=data_dir, limit=500)
    assert figures["accuracy"] == pytest.approx(direct["accuracy"])


@pytest.mark.parametrize("args,message", [
    (["classify", "/nonexistent/run"], "is not a DunDi run"),
    (["train", "--dataset", "imagenet", "--no-progress"], "argument --dataset: invalid choice: 'imagenet'"),
    (["train", "--loss", "hinge"], "argument --loss: invalid choice: 'hinge'"),
    (["train-native", "--model", "resnet"], "argument --model/--backbone: invalid choice: 'resnet'"),
])
def test_cli_bad_input_is_one_clear_line(args, message):
    out = _dundi(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_refuses_out_of_range_n(mnist_runs, data_dir):
    out = _dundi("classify", str(mnist_runs["dundi"]), "--n", "50", "--data-dir", data_dir)
    assert out.returncode == 2 and "n=50 is out of range" in out.stderr and "Traceback" not in out.stderr


def test_a_killed_local_training_resumes_where_it_stopped(data_dir, tmp_path):
    """SIGKILL `dundi train` (DunDi-AT, so PGD starts matter) once its first checkpoint is on
    disk; the rerun continues from it and ends with the weights of an uninterrupted run."""
    import os
    import signal
    import time

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "--dataset", "mnist-10k", "--backbone", "lenet1", "--limit", "1500", "--tuples", "3000",
            "--epochs", "4", "--adversarial", "--adv-steps", "2", "--oracles", "5", "--data-dir", data_dir,
            "--no-progress"]
    cmd = [sys.executable, "-m", "dundi"]
    subprocess.run(cmd + args + ["--out", str(tmp_path / "whole")], env=env, check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / ".checkpoint" / "latest.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "run.json").exists(), "the run finished before it was killed: nothing was tested"
    done = json.loads((out / ".checkpoint" / "latest.json").read_text())["directory"]

    again = subprocess.run(cmd + args + ["--out", str(out)], env=env, check=True, capture_output=True, text=True)
    assert "resumed after epoch" in again.stdout
    assert int(done.split("-")[1]) < 3
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())] == [0, 1, 2, 3]
    assert not (out / ".checkpoint").exists()
    whole, resumed = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)

    # a checkpoint of another configuration is refused, not silently mixed in
    (out / "run.json").unlink()
    proc = subprocess.Popen(cmd + args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / ".checkpoint" / "latest.json").exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    other = subprocess.run(cmd + [a if a != "3000" else "3100" for a in args] + ["--out", str(out)], env=env,
                           capture_output=True, text=True)
    assert other.returncode == 2 and "other settings (tuples 3000 -> 3100)" in other.stderr


def test_a_checkpoint_older_than_a_config_field_still_resumes(tmp_path):
    """A checkpoint written before a TrainConfig field existed is the same experiment (old code
    behaved as the field's default); a changed setting is still refused."""
    import dataclasses

    from dundi.errors import DundiError
    from dundi.nets.models import build_native
    from dundi.training.loop import fit

    rng = np.random.default_rng(0)
    x, y = rng.random((120, 1, 28, 28), dtype=np.float32), np.arange(120) % 4
    cfg = TrainConfig(arch="lenet1", epochs=2, batch_size=40)
    ckpt = tmp_path / "ckpt"

    def stop_after_first(epoch, metrics):
        if epoch == 1:  # a kill during the second epoch, after the first epoch's checkpoint
            raise KeyboardInterrupt
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fit(build_native("lenet1", (1, 28, 28), 4), x, y, cfg, "native", on_epoch=stop_after_first,
            progress=False, checkpoints=ckpt)
    latest = json.loads((ckpt / "latest.json").read_text())["directory"]
    state_file = ckpt / latest / "state.json"
    state = json.loads(state_file.read_text())
    for field in ("metric", "certified", "cert_eps"):  # as if written before these existed
        del state["config"][field]
    state_file.write_text(json.dumps(state))
    history = fit(build_native("lenet1", (1, 28, 28), 4), x, y, cfg, "native", progress=False,
                  checkpoints=ckpt)
    assert [e["epoch"] for e in history] == [0, 1]
    with pytest.raises(DundiError, match=r"other settings \(lr 0.001 -> 0.5\)"):
        fit(build_native("lenet1", (1, 28, 28), 4), x, y, dataclasses.replace(cfg, lr=0.5), "native",
            progress=False, checkpoints=ckpt)
