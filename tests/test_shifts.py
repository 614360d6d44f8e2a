"""The MNIST-C corruptions and OOD sets (dundi.evaluation.shifts): each corruption's invariant,
checked against an independent computation where one exists."""

import numpy as np
import pytest
from scipy import ndimage

from dundi.evaluation import shifts
from dundi.evaluation.shifts import CORRUPTIONS, corrupt, far_ood, glyphs


def digits(count=6, seed=0):
    """Digit-like images: a bright bar and ring on black, plus grey anti-aliasing."""
    rng = np.random.default_rng(seed)
    x = np.zeros((count, 1, 28, 28), np.float32)
    rows, cols = np.mgrid[0:28, 0:28]
    for i in range(count):
        r = rng.uniform(5, 8)
        ring = np.abs(np.hypot(rows - 14 + rng.uniform(-2, 2), cols - 14) - r) < 1.5
        x[i, 0][ring] = 1.0
        x[i, 0, 6:22, 13 + i % 3] = 0.6
    return x


def test_every_kind_keeps_shape_range_and_is_seeded():
    x = digits()
    assert len(CORRUPTIONS) == 15
    for kind in CORRUPTIONS:
        a, b = corrupt(x, kind, seed=3), corrupt(x, kind, seed=3)
        assert a.shape == x.shape and a.dtype == np.float32, kind
        assert a.min() >= 0 and a.max() <= 1, kind
        np.testing.assert_array_equal(a, b, err_msg=kind)
        assert not np.array_equal(a, x), f"{kind} left the images unchanged"


def test_random_kinds_depend_on_the_seed():
    x = digits()
    for kind in ("shot_noise", "impulse_noise", "glass_blur", "motion_blur", "fog", "spatter",
                 "dotted_line", "zigzag"):
        assert not np.array_equal(corrupt(x, kind, 1), corrupt(x, kind, 2)), kind


def test_shot_noise_is_poisson_counts_over_three():
    x = digits(20)
    c = corrupt(x, "shot_noise", seed=0).astype(np.float64)
    counts = c * 3
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-5)   # whole photon counts
    assert (c[x == 0] == 0).all()                                       # no light, no photons
    bright = c[x == 1.0]                                                # Poisson(3) / 3, clipped
    assert abs(bright.mean() - np.minimum(np.arange(40) / 3, 1) @ _poisson(3, 40)) < 0.03


def _poisson(lam, n):
    from math import exp, factorial
    return np.array([exp(-lam) * lam ** k / factorial(k) for k in range(n)])


def test_impulse_noise_hits_seventeen_percent_with_black_or_white():
    x = np.full((4, 1, 28, 28), 0.5, np.float32)
    c = corrupt(x, "impulse_noise", seed=0)
    hit = c != 0.5
    assert set(np.unique(c[hit])) <= {0.0, 1.0}
    assert (hit.reshape(4, -1).sum(1) == round(0.17 * 784)).all()
    assert 0.4 < (c[hit] == 1).mean() < 0.6


def test_brightness_and_stripe_are_exact_pixel_maps():
    x = digits()
    np.testing.assert_allclose(corrupt(x, "brightness"), np.minimum(x + 0.5, 1), atol=1e-7)
    s = corrupt(x, "stripe")
    np.testing.assert_allclose(s[..., :7], 1 - x[..., :7], atol=1e-7)
    np.testing.assert_allclose(s[..., 21:], 1 - x[..., 21:], atol=1e-7)
    np.testing.assert_array_equal(s[..., 7:21], x[..., 7:21])


def test_translate_moves_by_three_pixels_on_both_axes():
    x = np.zeros((8, 1, 28, 28), np.float32)
    x[:, 0, 14, 10] = 1
    c = corrupt(x, "translate", seed=0)
    for img in c[:, 0]:
        (r,), (col,) = np.nonzero(img)
        assert abs(r - 14) == 3 and abs(col - 10) == 3


def test_geometric_kinds_keep_the_centre_and_move_as_their_matrix_says():
    x = np.zeros((1, 1, 28, 28), np.float32)
    x[0, 0, 13:15, 13:15] = 1.0          # the centre 13.5 stays put under every map
    for kind in ("shear", "scale", "rotate"):
        c = corrupt(x, kind, seed=0)[0, 0]
        r, col = ndimage.center_of_mass(c)
        assert abs(r - 13.5) < 1e-6 and abs(col - 13.5) < 1e-6, kind
    # a point at radius 10 from the centre: rotation keeps its radius, scale maps it to 7
    p = np.zeros((1, 1, 28, 28), np.float32)
    p[0, 0, 13:15, 23:25] = 1.0           # centre of mass (13.5, 23.5): 10 right of the centre
    for kind, radius in (("rotate", 10.0), ("scale", 7.0)):
        r, col = ndimage.center_of_mass(corrupt(p, kind, seed=0)[0, 0])
        assert abs(np.hypot(r - 13.5, col - 13.5) - radius) < 0.35, kind
    r, col = ndimage.center_of_mass(corrupt(p, "rotate", seed=0)[0, 0])
    assert abs(abs(np.arctan2(r - 13.5, col - 13.5)) - 0.4) < 0.05


def test_blurs_keep_the_ink_nearly_and_lower_the_peaks():
    x = digits()
    for kind in ("glass_blur", "motion_blur"):
        c = corrupt(x, kind, seed=0)
        assert abs(c.sum() - x.sum()) / x.sum() < 0.08, kind
        assert np.abs(np.diff(c, axis=-1)).sum() < np.abs(np.diff(x, axis=-1)).sum(), kind


def test_fog_keeps_the_brightest_value_scale_and_greys_the_background():
    x = digits()
    c = corrupt(x, "fog", seed=0)
    assert (c.reshape(len(x), -1).max(1) <= x.reshape(len(x), -1).max(1) + 1e-6).all()
    assert (c[x == 0] > 0).mean() > 0.9


def test_plasma_is_a_normalised_power_of_two_map():
    p = shifts.plasma(np.random.default_rng(0), size=64)
    assert p.shape == (64, 64) and p.min() == 0 and p.max() == 1
    # a fractal: neighbours are closer than random pairs
    assert np.abs(np.diff(p, axis=0)).mean() < 0.5 * np.abs(p - p.mean()).mean() * 2


def test_spatter_paints_mud_or_keeps_the_pixel():
    x = digits(30)
    c = corrupt(x, "spatter", seed=0).astype(np.float64)
    changed = ~np.isclose(c, x)
    assert changed.any()
    # where changed, the pixel is a convex mix of the image and the mud colour 63/255
    mud = 63 / 255
    lo, hi = np.minimum(x, mud), np.maximum(x, mud)
    assert ((c >= lo - 1e-6) & (c <= hi + 1e-6)).all()


def test_lines_only_add_ink():
    x = digits(10)
    for kind in ("dotted_line", "zigzag"):
        c = corrupt(x, kind, seed=0)
        assert (c >= x - 1e-7).all(), kind
        assert (c.sum(axis=(1, 2, 3)) > x.sum(axis=(1, 2, 3))).all(), kind
    d = corrupt(np.zeros((5, 1, 28, 28), np.float32), "dotted_line", seed=0)
    for start in range(0, 28, 4):          # every other pair of columns stays dark
        assert (d[..., start:start + 2] == 0).all()


def test_canny_finds_a_square_s_outline_and_nothing_inside():
    img = np.zeros((28, 28))
    img[8:20, 8:20] = 1.0
    e = shifts.canny(img)
    assert set(np.unique(e)) <= {0.0, 1.0}
    assert e[12:16, 12:16].sum() == 0 and e[:4].sum() == 0       # flat regions: no edge
    ring = np.zeros_like(img, bool)
    ring[6:22, 6:22] = True
    ring[10:18, 10:18] = False
    assert e[ring].sum() >= 40 and e[~ring].sum() == 0           # the outline, all of it near the edge
    assert shifts.canny(np.zeros((28, 28))).sum() == 0


def test_unknown_kind_and_bad_shape_are_refused():
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(digits(), "snow")
    with pytest.raises(ValueError, match="28, 28"):
        corrupt(np.zeros((2, 28, 28), np.float32), "fog")


def test_far_ood_sets_and_glyphs():
    x = digits(5)
    sets = far_ood(x, seed=0)
    assert (sets["blank"] == 0).all() and (sets["white"] == 1).all()
    np.testing.assert_allclose(sets["inverted digits"], 1 - x)
    g = sets["constant grey"].reshape(5, -1)
    assert (g == g[:, :1]).all() and len(np.unique(g[:, 0])) == 5
    assert abs(sets["uniform noise"].mean() - 0.5) < 0.02
    for name, v in sets.items():
        assert v.shape == x.shape and v.dtype == np.float32 and 0 <= v.min() <= v.max() <= 1, name
    gl = glyphs(12, seed=0)
    assert gl.shape == (12, 1, 28, 28) and gl.max() == 1 and (gl[:, :, :3] == 0).all()
    np.testing.assert_array_equal(gl, glyphs(12, seed=0))
    ink = gl.reshape(12, -1) > 0.5
    rows = np.nonzero(ink.reshape(12, 28, 28).any(2))
    assert ink.mean() < 0.4 and rows[1].min() >= 3 and rows[1].max() <= 24   # a 20-pixel box


def test_scan_variations_are_the_stated_maps():
    x = digits(4)
    v = shifts.scan_variations(x, seed=0)
    np.testing.assert_allclose(v["contrast 70%"], 0.7 * x, atol=1e-7)
    noise = v["gaussian noise 0.1"].astype(np.float64) - x
    inside = (v["gaussian noise 0.1"] > 0) & (v["gaussian noise 0.1"] < 1)
    assert abs(noise[inside].std() - 0.1) < 0.02
