"""The selective signals (dundi.rule.selective_signals), their conformal calibration and the
risk-coverage figures (dundi.evaluation.selective), against brute-force references."""

import numpy as np

from dundi.evaluation.selective import aurc, confidence, p_values, risk_coverage
from dundi.rule.abstain_signals import abstain_flags
from dundi.rule.selective_signals import BLANK_RANGE, agreement, fine_margin, pixel_signals
from dundi.serving.abstain import GUARDS, thresholds_for


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


def test_pixel_signals_ignore_contrast_brightness_and_light_noise_but_see_blank_inverted_noise():
    rng = np.random.default_rng(0)
    x = np.zeros((1, 1, 28, 28))
    x[0, 0, 6:22, 12:16] = 1.0
    x[0, 0, 10:12, 8:20] = 1.0
    base = pixel_signals(x)
    for shifted in (0.7 * x, np.minimum(x + 0.5, 1), np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)):
        s = pixel_signals(shifted)
        assert abs(s["background"][0] - base["background"][0]) < 0.02
        assert s["smooth_grey"][0] < 0.05
    assert pixel_signals(np.zeros_like(x))["range"][0] < BLANK_RANGE
    assert pixel_signals(1 - x)["background"][0] > 0.8
    assert pixel_signals(rng.random(x.shape))["smooth_grey"][0] > 0.5


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


def test_calibration_withholds_at_most_the_rate_and_the_guard_always():
    rng = np.random.default_rng(2)
    values = {"abstain_threshold": rng.gamma(2, 1, 1000), "abstain_min_margin": rng.gamma(1, 1, 1000),
              "abstain_min_agree": rng.integers(0, 21, 1000).astype(float),
              "abstain_max_background": rng.beta(2, 8, 1000), "abstain_max_smooth_grey": rng.beta(1, 20, 1000),
              "abstain_min_range": np.where(np.arange(1000) < 3, 0.0, 1.0)}
    fields = ("abstain_threshold", "abstain_min_margin", "abstain_min_agree", "abstain_max_background",
              "abstain_max_smooth_grey")
    cal = thresholds_for(values, 0.01, fields)
    flags = abstain_flags(values, cal["thresholds"])
    assert flags[:3].all() and 0.005 <= flags.mean() <= 0.01
    assert cal["thresholds"]["abstain_min_range"] == GUARDS["abstain_min_range"]
    # the confidence orders as the rule withholds: the guard at -1, the withheld among the
    # least confident (the thresholds are order statistics of these very values)
    score = confidence(values, values, fields, GUARDS)
    assert (score[:3] == -1).all()
    assert score[flags].max() < np.quantile(score[~flags], 0.05)
