"""The candidate abstain signals the benchmark measures (dundi.evaluation.selective_candidates),
each against a direct, loop-by-loop reference."""

import numpy as np

from dundi.evaluation.selective_candidates import KNN_K, RIDGE, candidate_values, fit_reference, rescaled


def _data(seed=0, n=120, dim=6, classes=4):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    labels[:classes] = np.arange(classes)
    z = rng.normal(size=(n, dim)) + 3 * np.eye(classes, dim)[labels]
    images = rng.random((n, 1, 4, 4))
    return images, labels, z


def test_candidates_match_direct_references():
    images, labels, z = _data()
    ref = fit_reference(images, labels, z)
    q_img, _, q_z = _data(seed=1, n=15)
    fine = np.random.default_rng(2).normal(size=(15, 3)) * 5
    fine[0, 2] = -np.inf                                     # a class not kept
    got = candidate_values(ref, q_img, q_z, fine, n=4)
    classes = np.unique(labels)
    means = np.stack([z[labels == c].mean(0) for c in classes])
    within = np.concatenate([z[labels == c] - means[i] for i, c in enumerate(classes)])
    prec = np.linalg.inv(within.T @ within / len(z) + RIDGE * np.eye(z.shape[1]))
    prec_all = np.linalg.inv(np.cov(z.T, bias=True) + RIDGE * np.eye(z.shape[1]))
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    pix = rescaled(images)
    for i in range(len(q_z)):
        maha = min((q_z[i] - m) @ prec @ (q_z[i] - m) for m in means)
        assert np.isclose(got["mahalanobis"][i], maha)
        d0 = q_z[i] - z.mean(0)
        assert np.isclose(got["relative mahalanobis"][i], maha - d0 @ prec_all @ d0)
        u = q_z[i] / np.linalg.norm(q_z[i])
        assert np.isclose(got["knn embedding"][i], np.sort(np.linalg.norm(unit - u, axis=1))[KNN_K - 1])
        p = rescaled(q_img[i:i + 1])[0]
        assert np.isclose(got["knn pixels"][i], np.linalg.norm(pix - p, axis=1).min())
        f = fine[i][np.isfinite(fine[i])] / 4
        assert np.isclose(got["energy"][i], -np.log(np.exp(f).sum()))


def test_rescaled_is_blind_to_contrast_and_brightness():
    rng = np.random.default_rng(3)
    x = rng.random((3, 1, 5, 5))
    y = np.clip(0.6 * x + 0.2, 0, 1)
    np.testing.assert_allclose(rescaled(x), rescaled(y), atol=1e-9)
    assert (rescaled(np.full((1, 1, 5, 5), 0.4)) == 0).all()
    # a training image is its own nearest neighbour in pixels
    images, labels, z = _data()
    ref = fit_reference(images, labels, z)
    got = candidate_values(ref, images[:5], z[:5], np.zeros((5, 2)), n=1)
    assert np.allclose(got["knn pixels"], 0, atol=1e-6)
