"""The Python API checks images as the HTTP server does: shape, dtype, range and finiteness,
single images accepted, one DundiError naming the problem otherwise; native runs classify by
the argmax of their logits. Small untrained models, so no training is needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dundi.errors import DundiError
from dundi.nets.models import build_distance_net, build_native
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.data.pixels import validate_images
from dundi.run.directory import Run
from dundi.run.storage import save_model, save_oracle

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def dundi_run(tmp_path_factory) -> Path:
    """A DunDi run whose oracle j of class c is the embedding of image 10c + j (n = 2)."""
    path = tmp_path_factory.mktemp("api") / "dundi"
    torch.manual_seed(0)
    model = build_distance_net("lenet5", SHAPE, 16)
    save_model(path, model, {"kind": "dundi", "arch": "lenet5", "dataset": "mnist-10k",
                             "in_shape": list(SHAPE), "num_classes": 10, "embed_dim": 16, "mode": "R",
                             "config": {}})
    x = torch.rand(20, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb = model.eval()(x).numpy()
    save_oracle(path, OracleIndex(emb, 10, meta={"seed": 0}))  # rows c*2+j: class c = row // 2
    np.save(path / "oracle_images.npy", x.numpy())
    return path


@pytest.fixture(scope="module")
def native_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("api") / "native"
    torch.manual_seed(0)
    save_model(path, build_native("lenet1", SHAPE, 10),
               {"kind": "native", "arch": "lenet1", "dataset": "mnist-10k", "in_shape": list(SHAPE),
                "num_classes": 10})
    return path


def _images(path: Path) -> np.ndarray:
    return np.load(path / "oracle_images.npy")


def test_oracle_images_classify_as_their_class(dundi_run):
    run = Run.load(dundi_run)
    x = _images(dundi_run)
    res = run.classify(x, TwoStepRule(1, 1, 10))
    # with n = 1 the first oracle of each class (image 2c) is nearest to itself
    np.testing.assert_array_equal(res.labels[::2], np.arange(10))
    np.testing.assert_allclose(res.nearest_distance[::2], 0, atol=1e-3)


@pytest.mark.parametrize("layout", ["(H, W)", "(1, H, W)", "(1, 1, H, W)"])
def test_a_single_image_is_accepted_in_every_layout(dundi_run, layout):
    run = Run.load(dundi_run)
    x = _images(dundi_run)
    expected = run.classify(x[4:5], TwoStepRule(1, 1, 10))
    image = {"(H, W)": x[4, 0], "(1, H, W)": x[4], "(1, 1, H, W)": x[4:5]}[layout]
    got = run.classify(image, TwoStepRule(1, 1, 10))
    assert got.labels.shape == (1,)
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_allclose(got.fine_scores, expected.fine_scores)


def test_batch_without_channel_axis_and_torch_tensors_are_accepted(dundi_run):
    run = Run.load(dundi_run)
    x = _images(dundi_run)
    expected = run.classify(x).labels
    np.testing.assert_array_equal(run.classify(x[:, 0]).labels, expected)
    np.testing.assert_array_equal(run.classify(torch.from_numpy(x)).labels, expected)
    np.testing.assert_array_equal(run.classify(x.astype(np.float64)).labels, expected)


def test_uint8_pixels_are_converted_like_the_dataset_cache(dundi_run):
    run = Run.load(dundi_run)
    raw = (np.arange(20 * 28 * 28) % 256).astype(np.uint8).reshape(20, 1, 28, 28)
    floats = np.divide(raw, np.float32(255.0), dtype=np.float32)
    np.testing.assert_array_equal(validate_images(raw, SHAPE), floats)
    np.testing.assert_array_equal(run.classify(raw).labels, run.classify(floats).labels)


@pytest.mark.parametrize("images, message", [
    (np.full((2, 1, 28, 28), 255.0, np.float32), r"pixel values in \[255, 255\]; expected float pixels in \[0, 1\] \(8-bit pixels: divide by 255"),
    (np.full((2, 1, 28, 28), -0.5, np.float32), r"expected float pixels in \[0, 1\] \(undo any normalisation"),
    (np.full((2, 1, 28, 28), np.nan, np.float32), r"1568 NaN or Inf value\(s\)"),
    (np.full((1, 28, 28), np.inf, np.float32), r"784 NaN or Inf"),
    (np.zeros((2, 3, 28, 28), np.float32), r"shape \(2, 3, 28, 28\); expected a batch \(N, 1, 28, 28\)"),
    (np.zeros((32, 32), np.float32), r"shape \(32, 32\)"),
    (np.zeros(784, np.float32), r"shape \(784,\)"),
    (np.zeros((1, 1, 1, 28, 28), np.float32), r"shape \(1, 1, 1, 28, 28\)"),
    (np.zeros((2, 1, 28, 28), np.int64), r"integers \(dtype int64\); expected float pixels in \[0, 1\], or 8-bit"),
    (np.zeros((2, 1, 28, 28), bool), r"booleans"),
    (np.full((1, 28, 28), "a"), r"non-numeric values"),
    ([[0.0] * 28] * 27 + [[0.0] * 3], r"ragged|shape"),
])
def test_bad_images_get_one_clear_error(dundi_run, native_run, images, message):
    for path in (dundi_run, native_run):
        with pytest.raises(DundiError, match=message):
            Run.load(path).classify(images)


def test_0_255_pixels_are_refused_not_silently_misclassified(dundi_run):
    run = Run.load(dundi_run)
    x = _images(dundi_run)
    with pytest.raises(DundiError, match="divide by 255"):
        run.classify(x * 255)


def test_bad_parameters_are_refused(dundi_run, native_run):
    run = Run.load(dundi_run)
    x = _images(dundi_run)
    with pytest.raises(DundiError, match="n=3 is out of range"):
        run.classify(x, TwoStepRule(n=3))
    with pytest.raises(DundiError, match="k=11 must be between 1 and the number of classes"):
        run.classify(x, TwoStepRule(k=11))
    with pytest.raises(DundiError, match="batch_size=0"):
        run.classify(x, batch_size=0)
    with pytest.raises(DundiError, match="native run: it has no oracles"):
        Run.load(native_run).classify(x, TwoStepRule(n=1))
    with pytest.raises(DundiError, match="k=0 must be a whole number of at least 1"):
        Run.load(native_run).classify(x, TwoStepRule(k=0))
    with pytest.raises(DundiError, match="loaded without its oracle index"):
        Run.load(dundi_run, with_oracle=False).classify(x)


def test_default_m_follows_n(dundi_run):
    """m defaults to min(3, n), so n = 1 (Table 1) needs no m."""
    run = Run.load(dundi_run)
    x = _images(dundi_run)
    np.testing.assert_array_equal(run.classify(x, TwoStepRule(n=1)).labels, run.classify(x, TwoStepRule(n=1, m=1)).labels)


def test_native_runs_classify_by_argmax_of_logits(native_run):
    run = Run.load(native_run)
    x = np.random.default_rng(0).random((12, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        logits = run.model(torch.from_numpy(x)).numpy()
    res = run.classify(x, TwoStepRule(k=3))
    np.testing.assert_array_equal(res.labels, logits.argmax(1))
    assert res.topk_classes.shape == (12, 3)
    np.testing.assert_array_equal(res.topk_classes[:, 0], res.labels)
    np.testing.assert_allclose(res.fine_scores, np.take_along_axis(logits, res.topk_classes, 1), rtol=1e-6)
    assert (np.diff(res.fine_scores, axis=1) <= 0).all()  # best first
    assert np.isnan(res.nearest_distance).all()
    np.testing.assert_array_equal(run.classify(x[0, 0]).labels, res.labels[:1])


def test_an_empty_batch_gives_an_empty_result(dundi_run, native_run):
    for path in (dundi_run, native_run):
        res = Run.load(path).classify(np.zeros((0, 1, 28, 28), np.float32))
        assert res.labels.shape == (0,)
