"""The selective signals (dundi.rule.selective_signals), their conformal calibration and the
risk-coverage figures (dundi.evaluation.selective), against brute-force references."""

import numpy as np

from dundi.evaluation.selective import aurc, confidence, p_values, risk_coverage
from dundi.rule.abstain_signals import abstain_flags
from dundi.rule.selective_signals import (BACKGROUND_FLOOR, BLANK_RANGE, agreement, background_level, fine_margin,
                                         pixel_range)
from dundi.serving.abstain import FLOORS, GUARDS, guard_thresholds, levels, selective_thresholds, signal_scales


def test_fine_margin_is_the_gap_to_the_runner_up_per_oracle():
    fine = np.array([[-3.0, -5.0, -4.0], [-9.0, -2.0, -2.5], [-1.0, -1.0, -7.0]])
    pos = np.array([0, 1, 1])
    np.testing.assert_allclose(fine_margin(fine, pos, 2), [0.5, 0.25, 0.0])
    assert np.isinf(fine_margin(np.array([[-1.0]]), np.array([0]), 4)).all()


def test_agreement_counts_the_answers_oracles_among_the_n_nearest_brute_force():
    rng = np.random.default_rng(0)
    classes, n, dim = 5, 6, 4
    oracles = rng.normal(size=(classes, n, dim))
    mask = np.ones((classes, n), bool)
    mask[4, 3:] = False                       # a class holding 3 oracles (padded)
    z = rng.normal(size=(40, dim))
    kept = np.stack([rng.permutation(classes)[:3] for _ in z])
    labels = kept[:, 0]
    got = agreement(z, kept, labels, oracles, mask)
    for i in range(len(z)):                    # every kept oracle, sorted by distance
        cands = [(np.sum((oracles[c, j] - z[i]) ** 2), c) for c in kept[i] for j in range(n) if mask[c, j]]
        nearest = sorted(cands, key=lambda t: t[0])[:n]
        assert got[i] == sum(c == labels[i] for _, c in nearest)


def test_pixel_range_is_the_span_and_flags_only_strokeless_images():
    rng = np.random.default_rng(0)
    x = np.zeros((4, 1, 28, 28), np.float32)
    x[0, 0, 6:22, 12:16] = 1.0                      # a stroke
    x[1] = 0.7 * x[0]                                # the same at 70 % contrast
    x[2] = 0.4                                       # constant grey
    x[3] = np.clip(0.3 + 0.02 * rng.standard_normal((1, 28, 28)), 0, 1)   # a faint texture
    span = pixel_range(x)
    np.testing.assert_allclose(span[:3], [1.0, 0.7, 0.0], atol=1e-6)
    assert ((span < BLANK_RANGE) == [False, False, True, False]).all()


def test_background_level_is_the_quarter_order_statistic_and_spares_faint_and_noisy_digits():
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 28, 28)).astype(np.float32)
    got = background_level(x)
    for i in range(len(x)):                       # brute force: sort, take rank floor(784 / 4)
        assert got[i] == np.sort(x[i].ravel().astype(np.float64))[196]
    d = np.zeros((5, 1, 28, 28), np.float32)
    d[:, 0, 6:22, 10:18] = 1.0                        # a stroke covering 16 % of the frame
    d[1] *= 0.7                                       # faint
    d[2] = np.clip(d[2] + 0.1 * rng.standard_normal((1, 28, 28)), 0, 1)   # clipped pixel noise
    d[3] = np.clip(d[3] + 0.3, 0, 1)                  # a grey page
    d[4, 0] = np.clip(d[4, 0] + 0.5 * np.linspace(0, 1, 28)[None, :], 0, 1)   # a cloud across it
    level = background_level(d)
    assert (level[:3] == 0).all() and ((level > BACKGROUND_FLOOR) == [False, False, False, True, True]).all()


def test_p_values_are_the_share_at_least_as_extreme():
    cal = np.array([1.0, 2.0, 2.0, 3.0, 5.0])
    v = np.array([0.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(p_values(cal, v, 1), [(1 + 5) / 6, (1 + 4) / 6, (1 + 1) / 6, 1 / 6])
    np.testing.assert_allclose(p_values(cal, v, -1), [1 / 6, (1 + 3) / 6, (1 + 4) / 6, 6 / 6])


def test_risk_coverage_and_aurc_match_the_definition():
    rng = np.random.default_rng(1)
    score = rng.integers(0, 20, 300).astype(float)   # many ties
    correct = rng.random(300) < 0.2 + 0.04 * score
    coverage, risk = risk_coverage(score, correct)
    for c, r in zip(coverage, risk):
        j = int(round(c * 300))
        level = np.sort(score)[::-1][j - 1]
        answered = score >= level
        assert answered.sum() == j and np.isclose(r, (~correct[answered]).mean())
    brute = np.mean([(~correct[score >= np.sort(score)[::-1][j - 1]]).mean() for j in range(1, 301)])
    assert np.isclose(aurc(score, correct), brute)
    # an oracle ordering beats a random one, which is near the error rate
    assert aurc(correct.astype(float), correct) < aurc(score, correct) < (~correct).mean() + 0.02


def test_calibration_withholds_at_most_the_rate_guards_first_and_one_level():
    rng = np.random.default_rng(2)
    size = 1000
    values = {"abstain_threshold": rng.gamma(2, 1, size), "abstain_min_margin": rng.gamma(1, 1, size),
              "abstain_min_agree": rng.integers(0, 21, size).astype(float),
              "abstain_max_mean": rng.beta(2, 12, size),
              "abstain_min_range": np.where(np.arange(size) < 3, 0.0, 1.0),
              "abstain_max_background": np.where(np.arange(size) == 3, 0.5, 0.0)}
    cal = selective_thresholds(values, 0.01)
    flags = abstain_flags(values, cal["thresholds"])
    assert flags[:3].all() and not flags[3] and 0.008 <= flags.mean() <= 0.01
    assert cal["thresholds"]["abstain_min_range"] == GUARDS["abstain_min_range"]
    # the background guard: the held-out extreme where it lies above the floor, else the floor
    assert cal["thresholds"]["abstain_max_background"] == 0.5
    quiet = {**values, "abstain_max_background": np.zeros(size)}
    assert guard_thresholds(quiet, ())["abstain_max_background"] == FLOORS["abstain_max_background"]
    assert cal["thresholds"]["abstain_max_mean"] == values["abstain_max_mean"].max()
    # brute force: withheld exactly where a guard fires or the largest level exceeds the level
    scales = signal_scales(values, ("abstain_threshold", "abstain_min_margin", "abstain_min_agree"))
    lv = levels(values, scales)
    guards = guard_thresholds(values, ("abstain_max_mean",))
    expect = abstain_flags(values, guards) | (lv > cal["level"])
    mismatch = flags != expect      # only at a threshold's own rounding
    assert mismatch.sum() <= 1
    # the confidence orders as the rule withholds: the guarded at -inf, then the highest levels
    score = confidence(values, scales, guards)
    assert np.isneginf(score[:3]).all()
    assert score[flags & ~mismatch].max() < score[~flags & ~mismatch].min()
