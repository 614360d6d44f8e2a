"""The abstain rule as a run stores it: `dundi index calibrate` records the thresholds it
calibrated with the live index version's metadata in run.json, naming the index file they were
measured on and the rule (n, m, k) they were measured under; readers ask by both, so a
threshold never outlives the oracles or the rule it was measured against. The write, under the
run's lock, is :func:`dundi.serving.abstain.save_calibration`."""

from __future__ import annotations

from dundi.rule.params import ResolvedRule

KEY = "abstain"  # the field of the live index version's record in run.json
# How the abstain rule is calibrated unless told otherwise (`dundi index calibrate`, `dundi serve`):
# the share of clean held-out images it may withhold, and how many held-out images it looks at.
FALSE_ABSTAIN_RATE = 0.01
CALIBRATION_LIMIT = 2000


def calibration_fields(calibration: dict, source: str, index_sha: str) -> dict:
    """The run.json fields that store ``calibration`` (thresholds, n, m, k, rates), measured on
    ``source`` against the index file ``index_sha``."""
    return {KEY: {**calibration, "source": source, "index_sha256": index_sha}}


def stored_calibration(meta: dict, rule: ResolvedRule, index_sha: str) -> dict | None:
    """The abstain rule stored for the index file ``index_sha`` under this resolved two-step
    rule (distances depend on n, m, k and the index), or None."""
    cal = (meta.get("oracle") or {}).get(KEY)
    if cal and (cal.get("n"), cal.get("m"), cal.get("k"), cal.get("index_sha256")) == \
            (rule.n, rule.m, rule.k, index_sha):
        return cal
    return None
