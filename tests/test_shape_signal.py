"""The shape signal of the abstain rule: its arithmetic against independent references, its
invariances, its basis stored and verified with the run, and the served rule withholding
filled shapes (garment-like blobs) that pass every other guard."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from dundi.errors import DundiError
from dundi.rule.abstain_signals import ABSTAIN_SIGNALS
from dundi.rule.shape_signal import SHAPE_FILE, fit_basis, prepare, shape_distance, smooth
from dundi.run.storage import load_shape_basis, read_meta, save_shape_basis, update_meta
from dundi.serving import ModelConfig
from dundi.serving.model import LoadedModel


@pytest.fixture(scope="module")
def digits(data_dir):
    from dundi.data import load_split

    images, _, _ = load_split("mnist-10k", "train", data_dir, limit=1500)
    return images


def blobs(count: int, seed: int = 0) -> np.ndarray:
    """Large filled ellipses (radii 10-13 pixels) of random place and brightness: no stroke, no
    digit (a shirt's or a bag's silhouette is one). Smaller ones look like a filled zero."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:28, 0:28]
    out = np.zeros((count, 1, 28, 28), np.float32)
    for i in range(count):
        r0, c0 = rng.uniform(10, 18, 2)
        a, b = rng.uniform(10, 13, 2)
        inside = ((rows - r0) / a) ** 2 + ((cols - c0) / b) ** 2 <= 1
        out[i, 0][inside] = rng.uniform(0.5, 1.0)
    return out


def test_the_blur_is_scipys_gaussian_with_a_black_page():
    x = np.random.default_rng(0).random((3, 28, 28))
    for sigma in (0.7, 1.0, 2.0):
        want = np.stack([gaussian_filter(img, sigma, mode="constant", cval=0.0, truncate=4.0) for img in x])
        np.testing.assert_allclose(smooth(x, sigma), want, rtol=0, atol=1e-12)


def test_the_distance_is_the_least_squares_residual_over_the_norm(digits):
    """Brute force: the residual of the prepared image minus the mean after the best
    combination of the basis vectors (np.linalg.lstsq), over the prepared image's norm."""
    basis = fit_basis(digits[:1000], components=20)
    np.testing.assert_allclose(basis.basis @ basis.basis.T, np.eye(20), atol=1e-10)  # orthonormal rows
    probe = np.concatenate([digits[1000:1010], blobs(5)])
    x = prepare(probe, basis.blur)
    z = x - basis.mean
    coef = np.linalg.lstsq(basis.basis.T, z.T, rcond=None)[0]
    want = np.linalg.norm(z - (basis.basis.T @ coef).T, axis=1) / np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(shape_distance(basis, probe), want, rtol=1e-9)


def test_values_do_not_depend_on_the_batch_or_on_contrast(digits):
    basis = fit_basis(digits[:1000])
    probe = digits[1000:1040]
    together = shape_distance(basis, probe)
    alone = np.concatenate([shape_distance(basis, probe[i:i + 1]) for i in range(len(probe))])
    assert np.array_equal(together, alone)  # the same bits, batch of 40 or of 1
    np.testing.assert_allclose(shape_distance(basis, probe * 0.7), together, rtol=1e-6)  # a faint scan (float32 rounding)
    assert np.isfinite(shape_distance(basis, np.zeros((2, 1, 28, 28), np.float32))).all()  # a blank page
    colour = np.random.default_rng(1).random((20, 3, 8, 8))   # channels are blurred one by one
    cb = fit_basis(colour[:15], components=5)
    together = shape_distance(cb, colour[15:])
    assert np.array_equal(together, np.concatenate([shape_distance(cb, colour[i:i + 1]) for i in range(15, 20)]))


def test_digits_lie_near_the_subspace_and_filled_shapes_do_not(digits):
    basis = fit_basis(digits[:1000])
    held_out = shape_distance(basis, digits[1000:1500])
    assert (shape_distance(basis, blobs(100)) > np.quantile(held_out, 0.99)).mean() >= 0.9


def _without_basis(mnist_runs, tmp_path) -> Path:
    """A copy of the shared run as indexed before the shape signal existed: no basis."""
    run = tmp_path / "dundi"
    shutil.copytree(mnist_runs["dundi"], run)
    assert SHAPE_FILE in read_meta(run)["files"]          # `index build` fitted one
    (run / SHAPE_FILE).unlink()
    update_meta(run, files={k: v for k, v in read_meta(run)["files"].items() if k != SHAPE_FILE})
    return run


def test_the_basis_is_stored_verified_and_required(mnist_runs, tmp_path, digits):
    run = _without_basis(mnist_runs, tmp_path)
    with pytest.raises(DundiError, match="has no shape basis"):
        LoadedModel(ModelConfig(str(run), abstain_max_shape=0.5))
    assert load_shape_basis(run, read_meta(run)) is None
    basis = fit_basis(digits[:500])
    meta = save_shape_basis(run, basis)
    loaded = load_shape_basis(run, meta)
    assert np.array_equal(loaded.basis, basis.basis) and np.array_equal(loaded.mean, basis.mean)
    assert LoadedModel(ModelConfig(str(run), abstain_max_shape=0.5)).shape is not None
    with open(run / SHAPE_FILE, "r+b") as fh:  # a changed file is refused, not read
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(DundiError, match="does not match the sha256"):
        LoadedModel(ModelConfig(str(run)))


def test_calibrating_fits_the_basis_and_the_served_rule_withholds_filled_shapes(mnist_runs, tmp_path, data_dir):
    from dundi.cli.main import main
    from dundi.data import load_split
    from dundi.rule.params import TwoStepRule
    from dundi.serving.served import served_model

    run = _without_basis(mnist_runs, tmp_path)
    _, unshaped, how = served_model(str(run), TwoStepRule(m=3, k=5), data_dir=data_dir)  # a service reads only
    assert unshaped.shape is None and "without the shape signal" in how and SHAPE_FILE not in read_meta(run)["files"]
    assert main(["index", "calibrate", str(run), "--limit", "600", "--data-dir", data_dir]) == 0
    assert SHAPE_FILE in read_meta(run)["files"]
    config, served, _ = served_model(str(run), TwoStepRule(m=3, k=5), data_dir=data_dir)
    assert config.abstain_max_shape is not None
    assert "abstain_max_shape" in served.info.uncertified_signals   # outside the certified radius
    shapes = blobs(100, seed=1)
    answer = served.predict(shapes)
    assert answer.abstained.mean() >= 0.9
    # the other signals alone let most of them through: the shape signal does the work here
    unshaped = LoadedModel(ModelConfig(str(run), **{**{f: getattr(config, f) for f in ABSTAIN_SIGNALS},
                                                    "abstain_max_shape": None}), run=served.run)
    assert unshaped.predict(shapes).abstained.mean() < answer.abstained.mean()
    test, _, _ = load_split("mnist-10k", "test", data_dir, limit=300)
    assert served.predict(test).abstained.mean() <= 0.05

