"""The abstain rule: calibrated on held-out data at a stated false-abstain rate, stored with
the index, served by default, and flagging inputs that are plainly not digits."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from dundi.errors import DundiError
from dundi.rule.abstain_store import stored_calibration
from dundi.rule.params import TwoStepRule
from dundi.run.storage import index_sha256
from dundi.serving import ModelConfig, RequestError
from dundi.serving.abstain import (
    LEGACY_FIELDS,
    SELECTIVE_FIELDS,
    SIGNALS,
    abstain_flags,
    abstain_settings,
    calibrate_rule,
    rule_values,
    held_out_images,
    signal_values,
)
from dundi.serving.model import LoadedModel


@pytest.fixture()
def run_copy(mnist_runs, tmp_path):
    """A copy of the shared run: calibrating writes into run.json."""
    dst = tmp_path / "dundi"
    shutil.copytree(mnist_runs["dundi"], dst)
    return dst


@pytest.fixture(scope="module")
def model(mnist_runs):
    """The shared run, with the shape basis `index build` fitted (the default rule's fourth signal)."""
    loaded = LoadedModel(ModelConfig(str(mnist_runs["dundi"])))
    assert loaded.shape is not None
    return loaded


@pytest.fixture(scope="module")
def held_out(model, data_dir):
    images, labels, source = held_out_images(model.run, data_dir, limit=600)
    assert "validation part" in source  # never the test split
    return images, labels


@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_calibration_abstains_on_the_stated_share_of_its_own_data(model, held_out, rate):
    """On the images it was calibrated on, the served rule (LoadedModel with the thresholds)
    abstains on at most ``rate`` and no less than ``rate`` minus its sampling error; every
    signal has a threshold (depth 0 = the most extreme calibration value: still a threshold).
    The four signals served before (legacy); the selective default is checked below."""
    images, labels = held_out
    cal = calibrate_rule(model, images, labels, rate=rate, legacy=True)
    served = LoadedModel(ModelConfig(str(model.run.path), **cal["thresholds"]))
    abstained = served.predict(images).abstained
    measured = float(abstained.mean())
    assert measured == pytest.approx(cal["abstain_rate"])
    assert measured <= rate
    assert measured >= rate - 2 * np.sqrt(rate * (1 - rate) / len(images))
    assert set(cal["depth"]) == set(LEGACY_FIELDS) and all(cal["thresholds"][f] is not None for f in LEGACY_FIELDS)
    assert sum(cal["depth"].values()) >= 1
    # independently: the rule is "any signal beyond its threshold", signal by signal
    emb = model.run.embed(images)
    nearest = model.run.oracle.classify(emb, TwoStepRule(model.rule.n, 3, 5)).nearest_distance
    values = signal_values(images, emb, nearest)
    th = cal["thresholds"]
    by_hand = ((values["abstain_threshold"] > th["abstain_threshold"])
               | (values["abstain_min_norm"] < th["abstain_min_norm"])
               | (values["abstain_max_grey"] > th["abstain_max_grey"])
               | (values["abstain_max_mean"] > th["abstain_max_mean"]))
    assert abstained.tolist() == by_hand.tolist()


@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_the_selective_default_withholds_the_stated_share_signal_by_signal(model, held_out, rate):
    """The default rule (distance, margin, agreement and shape above one level; the mean pixel
    beyond the held-out maximum; the blank and background guards) served by LoadedModel withholds at most ``rate`` of its
    own calibration images, exactly where one of its thresholds is crossed."""
    images, labels = held_out
    cal = calibrate_rule(model, images, labels, rate=rate)
    th = cal["thresholds"]
    assert all(th[f] is not None for f in SELECTIVE_FIELDS) and th["abstain_max_grey"] is None
    served = LoadedModel(ModelConfig(str(model.run.path), **th))
    abstained = served.predict(images).abstained
    assert float(abstained.mean()) == pytest.approx(cal["abstain_rate"])
    assert rate - 2 * np.sqrt(rate * (1 - rate) / len(images)) <= abstained.mean() <= rate
    _, values = rule_values(served, images)
    by_hand = ((values["abstain_threshold"] > th["abstain_threshold"])
               | (values["abstain_min_margin"] < th["abstain_min_margin"])
               | (values["abstain_min_agree"] < th["abstain_min_agree"])
               | (values["abstain_max_mean"] > th["abstain_max_mean"])
               | (values["abstain_min_range"] < th["abstain_min_range"])
               | (values["abstain_max_background"] > th["abstain_max_background"])
               | (values["abstain_max_shape"] > th["abstain_max_shape"]))
    assert abstained.tolist() == by_hand.tolist()
    blank = np.zeros((3, 1, 28, 28), np.float32)
    assert served.predict(blank).abstained.all()
    # the signals the certificate does not bound are named as served outside the radius
    assert set(served.info.uncertified_signals) == {"abstain_min_agree", "abstain_max_background",
                                                    "abstain_max_shape"}
    fog = np.clip(images[:5] + 0.3, 0, 1)              # a digit on a grey page
    assert served.predict(fog).abstained.all()


def test_plainly_foreign_inputs_abstain_and_digits_mostly_do_not(model, held_out, data_dir):
    from dundi.data import load_split

    images, labels = held_out
    cal = calibrate_rule(model, images, labels, rate=0.01)
    served = LoadedModel(ModelConfig(str(model.run.path), **cal["thresholds"]))
    test, _, _ = load_split("mnist-10k", "test", data_dir, limit=300)
    noise = np.random.default_rng(0).random((100, 1, 28, 28), dtype=np.float32)
    assert served.predict(noise).abstained.mean() >= 0.95
    assert served.predict(1.0 - test[:100]).abstained.mean() >= 0.95  # inverted digits
    assert served.predict(test).abstained.mean() <= 0.05
    # the distance alone, calibrated the same way, misses most noise: why the other signals exist
    dist_only = calibrate_rule(model, images, labels, rate=0.01, fields=("abstain_threshold",))
    assert dist_only["thresholds"]["abstain_min_norm"] is None
    alone = LoadedModel(ModelConfig(str(model.run.path), **dist_only["thresholds"]))
    assert alone.predict(noise).abstained.mean() < served.predict(noise).abstained.mean()


def test_flags_follow_each_signal_direction():
    values = {"abstain_threshold": np.array([1.0, 5.0, 1.0]), "abstain_min_norm": np.array([3.0, 3.0, 0.5])}
    th = {"abstain_threshold": 4.0, "abstain_min_norm": 1.0}
    assert abstain_flags(values, th).tolist() == [False, True, True]
    assert abstain_flags(values, {"abstain_threshold": None, "abstain_min_norm": None}).tolist() == [False] * 3


def test_index_calibrate_stores_the_rule_and_serve_uses_it_by_default(run_copy, data_dir):
    from dundi.cli.main import main
    from dundi.run.storage import read_meta
    from dundi.serving.served import served_model

    assert main(["index", "calibrate", str(run_copy), "--false-abstain", "0.02", "--limit", "600",
                 "--data-dir", data_dir, "--json"]) == 0
    meta = read_meta(run_copy)
    sha = index_sha256(meta)
    stored = stored_calibration(meta, TwoStepRule(10, 3, 5), sha)
    assert stored and stored["rate"] == 0.02 and stored["abstain_rate"] <= 0.02
    assert "validation part" in stored["source"]
    assert stored_calibration(meta, TwoStepRule(10, 3, 4), sha) is None  # other k: other distances
    assert stored_calibration(meta, TwoStepRule(10, 3, 5), "another index") is None
    rule = TwoStepRule(m=3, k=5)
    config, _, how = served_model(str(run_copy), rule, data_dir=data_dir, limit=600)
    assert {f: getattr(config, f) for f in SIGNALS} == stored["thresholds"]
    assert "dundi index calibrate" in how
    config, model, _ = served_model(str(run_copy), rule, abstain_threshold="none")
    assert all(getattr(config, f) is None for f in SIGNALS)
    config, _, _ = served_model(str(run_copy), rule, abstain_threshold=2.5)
    assert config.abstain_threshold == 2.5 and config.abstain_min_norm is None


def test_rebuilding_the_index_drops_the_stored_rule(run_copy, data_dir):
    from dundi.cli.main import main
    from dundi.run.storage import read_meta
    from dundi.run.pipeline import build_index

    assert main(["index", "calibrate", str(run_copy), "--limit", "300", "--data-dir", data_dir]) == 0
    before = read_meta(run_copy)
    assert stored_calibration(before, TwoStepRule(10, 3, 5), index_sha256(before))
    build_index(run_copy, n=10, seed=1, data_dir=data_dir)
    after = read_meta(run_copy)
    assert stored_calibration(after, TwoStepRule(10, 3, 5), index_sha256(after)) is None
    assert stored_calibration(after, TwoStepRule(10, 3, 5), index_sha256(before)) is None
    model = LoadedModel(ModelConfig(str(run_copy)))
    fields, how = abstain_settings(model, None, data_dir=data_dir, limit=300)
    assert "calibrated now" in how and fields["abstain_threshold"] is not None


def test_bad_abstain_settings_are_refused():
    with pytest.raises(RequestError, match="abstain_min_norm"):
        ModelConfig.from_dict({"run": "r", "abstain_min_norm": -1})
    with pytest.raises(RequestError, match="abstain_max_mean"):
        ModelConfig.from_dict({"run": "r", "abstain_max_mean": "high"})


def test_calibration_refuses_empty_data_and_bad_rates(model, held_out):
    images, labels = held_out
    with pytest.raises(DundiError, match="no held-out images"):
        calibrate_rule(model, images[:0], labels[:0])
    for rate in (0.0, 1.0, -0.1):
        with pytest.raises(DundiError, match="false-abstain rate"):
            calibrate_rule(model, images, labels, rate=rate)


def test_a_run_without_a_validation_part_is_refused_not_calibrated_on_test(run_copy, data_dir):
    """The test split is never used to calibrate: without held-out training images there is
    one line saying what to do instead."""
    import json

    meta = json.loads((run_copy / "run.json").read_text())
    meta["config"]["val_fraction"] = 0.0
    (run_copy / "run.json").write_text(json.dumps(meta))
    model = LoadedModel(ModelConfig(str(run_copy)))
    with pytest.raises(DundiError, match="--val-fraction 0.1, or serve with --abstain-threshold none"):
        held_out_images(model.run, data_dir)
    fields, _ = abstain_settings(model, "none")
    assert all(v is None for v in fields.values())


def test_dundi_serve_abstains_by_default_over_http(run_copy, data_dir, tmp_path):
    """`dundi serve RUN` with no abstain flag (plain uvicorn, real HTTP on 127.0.0.1): the rule
    is calibrated at start (none stored), reported in the model's parameters, and noise is
    answered "unknown" while digits get labels."""
    import httpx
    from test_serve_cli import Server  # the serve tests' subprocess helper (tests/ is on sys.path)

    from dundi.data import load_split

    srv = Server(run_copy, ["--no-ray", "--data-dir", data_dir], tmp_path / "serve.log")
    try:
        srv.wait_ready(timeout=300)
        params = httpx.get(f"{srv.url}/v2/models/dundi", timeout=30).json()["parameters"]
        served = (*SELECTIVE_FIELDS, "abstain_max_mean", "abstain_min_range", "abstain_max_background")
        assert all(params[f] is not None for f in served) and params["abstain_max_grey"] is None, params
        digits, _, _ = load_split("mnist-10k", "test", data_dir, limit=20)
        noise = np.random.default_rng(1).random((5, 28, 28), dtype=np.float32)
        body = np.concatenate([digits[:, 0], noise]).tolist()
        answers = httpx.post(f"{srv.url}/classify", json=body, timeout=60).json()["results"]
        assert [a["abstained"] for a in answers[20:]] == [True] * 5
        assert all(a["label"] is None and a["class_name"] == "unknown" for a in answers[20:])
        assert sum(a["abstained"] for a in answers[:20]) <= 1
    finally:
        assert srv.stop() == 0
    assert "abstain rule calibrated now" in srv.output()
