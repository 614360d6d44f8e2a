"""Rates quoted in prose with a 95% interval: each must be the Wilson interval of its count (the
count beside it, else one of the sample sizes the pages publish)."""

from __future__ import annotations

import re

from dundi.evaluation.figures.raw import pct, wilson_text


# "80.15% [95% CI 78.3–81.8]", "**82.40%** robust white-box [80.7–84.0] (1,648/2,000)"
QUOTED = re.compile(r"(?P<p>\d{1,3}(?:\.\d+)?)%[^\[\]%|]{0,40}?\[(?:95% CI )?(?P<lo>\d{1,3}\.\d)[–-]"
                    r"(?P<hi>\d{1,3}\.\d)%?\](?: \((?P<k>[\d,]+)/(?P<n>[\d,]+)\))?")
# the test-set samples the pages publish; a quoted interval without its count must be the Wilson
# interval of one of them
SAMPLE_SIZES = (200, 256, 300, 500, 1000, 2000, 10000)


def _consistent(p: str, lo: str, hi: str, n: int, k: int | None = None) -> bool:
    digits = len(p.split(".")[1]) if "." in p else 0
    k = round(float(p) * n / 100) if k is None else k
    return pct(k / n, digits) == f"{p}%" and wilson_text(k, n) == f"{lo}–{hi}"


def interval_errors(text: str) -> list[str]:
    """Each rate quoted with a 95% interval that is not the Wilson interval of its count (the
    count beside it, else some published sample size)."""
    flat = re.sub(r"\s+", " ", text.replace("**", ""))
    errors = []
    for m in QUOTED.finditer(flat):
        if m["k"]:
            ok = _consistent(m["p"], m["lo"], m["hi"], int(m["n"].replace(",", "")), int(m["k"].replace(",", "")))
        else:
            ok = any(_consistent(m["p"], m["lo"], m["hi"], n) for n in SAMPLE_SIZES)
        if not ok:
            errors.append(m.group(0))
    return errors
