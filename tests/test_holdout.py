"""Training with held-out classes: the run never sees them, and its index holds only the rest."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dundi.data import load_split
from dundi.rule.params import TwoStepRule
from dundi.run.directory import Run
from dundi.run.pipeline import classify_split, drop_holdout, kept_classes
from dundi.training.config import TrainConfig

pytestmark = pytest.mark.realdata


def test_drop_holdout_keeps_other_rows_and_renumbers():
    labels = np.array([0, 3, 1, 2, 3, 0, 2])
    images = np.arange(len(labels), dtype=np.float32)[:, None]
    ids = np.arange(100, 100 + len(labels))
    kept = kept_classes(TrainConfig(holdout_classes=[1]), 4)
    np.testing.assert_array_equal(kept, [0, 2, 3])
    x, y, i = drop_holdout(images, labels, ids, kept)
    np.testing.assert_array_equal(i, [100, 101, 103, 104, 105, 106])
    # class 2 -> 1, class 3 -> 2: the label of each kept row names its class's place in `kept`
    np.testing.assert_array_equal(kept[y], labels[labels != 1])
    np.testing.assert_array_equal(x[:, 0], i - 100)


def test_holdout_config_is_canonical_and_checked():
    assert TrainConfig(holdout_classes=[7, 3, 7]).holdout_classes == (3, 7)
    with pytest.raises(Exception, match="holdout-classes"):
        kept_classes(TrainConfig(holdout_classes=[10]), 10)
    with pytest.raises(Exception, match="at least two"):
        kept_classes(TrainConfig(holdout_classes=list(range(9))), 10)


def test_holdout_run_never_trains_or_indexes_held_out_classes(tmp_path, data_dir):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "dundi", "train", "--dataset", "mnist-10k", "--limit", "1200",
           "--tuples", "1500", "--epochs", "1", "--holdout-random", "2", "--seed", "3", "--oracles", "5",
           "--no-progress", "--data-dir", data_dir, "--out", str(out), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "run.json").read_text())
    held = meta["config"]["holdout_classes"]
    assert len(held) == 2 and meta["num_classes"] == 8
    assert sorted(meta["dataset_classes"] + held) == list(range(10))
    # every oracle is a training image of a kept class
    run = Run.load(out)
    train_x, train_y, train_ids = load_split("mnist-10k", "train", data_dir, limit=1200)
    oracle_ids = np.asarray(run.oracle.meta["ids"])
    classes = train_y[np.searchsorted(train_ids, oracle_ids)]
    assert not np.isin(classes, held).any() and set(classes) == set(meta["dataset_classes"])
    # accuracy is over the kept classes' test images only
    _, test_y, _ = load_split("mnist-10k", "test", data_dir)
    assert classify_split(out, TwoStepRule(n=5), data_dir=data_dir)["count"] == int((~np.isin(test_y, held)).sum())
