"""Selective-classification figures for an abstain rule: conformal scores, risk against
coverage, AURC, and the per-set table of the abstain benchmark (bench/abstain.py).

A rule is judged as Geifman & El-Yaniv judge a selective classifier: order the answers by a
confidence, answer the most confident share (the coverage) and count the errors among them
(the risk). The area under that curve (AURC) is small when the errors are the answers the rule
is least sure of. The confidence of a rule made of thresholded signals is DkNN's credibility
made conformal: each signal standardized against its held-out clean values (median and 99th
percentile), the largest level over the rule's signals being its nonconformity; the guards
come first. The selective rule withholds exactly above one calibrated level, so its curve and
its served answers order inputs alike; ``p_values`` gives each signal's conformal p-value.
"""

from __future__ import annotations

import numpy as np

from dundi.rule.abstain_signals import ABSTAIN_SIGNALS, abstain_flags


def p_values(calibration: np.ndarray, values: np.ndarray, direction: int) -> np.ndarray:
    """(B,) conformal p-value of each value: (1 + how many calibration values are at least as
    extreme, in the signal's ``direction``) / (N + 1)."""
    cal = np.sort(direction * np.asarray(calibration, np.float64))
    v = direction * np.asarray(values, np.float64)
    at_least = len(cal) - np.searchsorted(cal, v, side="left")
    return (1 + at_least) / (len(cal) + 1)


def confidence(values: dict[str, np.ndarray], scales: dict, guards: dict[str, float]) -> np.ndarray:
    """(B,) a rule's confidence: minus its nonconformity (the largest standardized level of its
    scaled signals, :func:`dundi.rule.abstain_signals.levels`), and -inf where a guard withholds --
    so a rule withholding above one level withholds exactly the least confident."""
    from dundi.rule.abstain_signals import levels

    score = -levels(values, scales)
    if guards:
        score = np.where(abstain_flags(values, guards), -np.inf, score)
    return score


def risk_coverage(score: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk) at each distinct confidence level, most confident first: answering
    every input at least that confident covers that share with that error rate. Ties in the
    confidence are answered or withheld together."""
    order = np.argsort(-np.asarray(score, np.float64), kind="stable")  # -inf (guarded) last
    s, wrong = np.asarray(score)[order], ~np.asarray(correct, bool)[order]
    errors = np.cumsum(wrong)
    ends = np.r_[np.nonzero(s[1:] != s[:-1])[0], len(s) - 1]   # last index of each tie group
    answered = ends + 1
    return answered / len(s), errors[ends] / answered


def aurc(score: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean over answered counts j = 1..N of the risk
    among the j most confident answers (a tie group's risk for all its members)."""
    coverage, risk = risk_coverage(score, correct)
    sizes = np.diff(np.r_[0, np.round(coverage * len(score)).astype(np.int64)])
    return float((risk * sizes).sum() / len(score))


def table_row(flags: np.ndarray, correct: np.ndarray) -> dict:
    """withheld, accuracy when answering (NaN when nothing is answered) and accuracy without
    abstaining of one set."""
    answered = ~flags
    return {"count": int(len(flags)), "withheld": float(flags.mean()),
            "accuracy_answering": float(correct[answered].mean()) if answered.any() else float("nan"),
            "accuracy_all": float(correct.mean())}


__all__ = ["p_values", "confidence", "risk_coverage", "aurc", "table_row"]
