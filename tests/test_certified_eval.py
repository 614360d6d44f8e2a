"""Certificates on a trained run: dundi certify, and certificates beside a real evaluation —
no attack may flip a certified sample, and certified ≤ robust ≤ clean accuracy."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dundi.data import load_split
from dundi.errors import DundiError
from dundi.evaluation.certified_eval import CERTIFIED_FILE, certified_curve, check_certificates
from dundi.rule.params import TwoStepRule
from dundi.run.directory import Run
from dundi.run.pipeline import certify_split

pytestmark = [pytest.mark.realdata]


def _dundi(*args):
    return subprocess.run([sys.executable, "-m", "dundi", *args], capture_output=True, text=True,
                          timeout=900)


def test_certify_split_counts_only_correct_certified_answers(certified_run, data_dir):
    figures = certify_split(certified_run, eps=[0.01, 0.05, 0.1], rule=TwoStepRule(n=10, m=3, k=5), data_dir=data_dir, limit=300)
    acc = figures["certified_accuracy"]
    assert figures["metric"] == "sqeuclidean" and figures["count"] == 300
    assert figures["clean_accuracy"] > 0.5
    # monotone in eps, never above clean accuracy, and not vacuous at the smallest eps
    assert figures["clean_accuracy"] >= acc["0.01"] >= acc["0.05"] >= acc["0.1"]
    assert acc["0.01"] > 0.2
    # the same figure from the certifier directly, image by image
    run = Run.load(certified_run)
    x, y, _ = load_split("mnist-10k", "test", data_dir, limit=300)
    ok = run.certifier(TwoStepRule(10, 3, 5)).certified_at(torch.from_numpy(x), torch.from_numpy(y), 0.05)
    assert float(ok.float().mean()) == pytest.approx(acc["0.05"])


def test_certify_refuses_uncertifiable_runs_and_bad_eps(mnist_runs, certified_run, tmp_path):
    out = _dundi("certify", str(mnist_runs["dundi"]), "--eps", "0.1")
    assert out.returncode == 2 and "train --certified" in out.stderr and "Traceback" not in out.stderr
    out = _dundi("certify", str(certified_run), "--eps", "1.5")
    assert out.returncode == 2 and "(0, 1]" in out.stderr and "Traceback" not in out.stderr


def test_evaluation_certificates_are_never_flipped_by_attacks(certified_run, data_dir, tmp_path):
    """Adaptive PGD on the exact rule and the feature attack at two budgets; every sample
    certified at a budget survives every attack up to it, and the figures are ordered."""
    out = tmp_path / "eval"
    res = _dundi("evaluate", str(certified_run), "--threat", "adaptive", "feature", "--attacks", "pgd",
                 "--eps", "0.02", "0.05", "--steps", "20", "--limit", "96", "--n", "10", "--workers", "0",
                 "--no-progress", "--out", str(out), "--data-dir", data_dir, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    cert = {c["eps"]: c for c in summary["certified"]}
    assert set(cert) == {0.02, 0.05}
    for c in cert.values():
        assert c["certified_accuracy"] <= c["robust_accuracy"] <= c["clean_accuracy"]
    assert cert[0.02]["certified_accuracy"] > 0.1  # there are certified samples to attack
    table = pq.read_table(out / CERTIFIED_FILE)
    assert table.num_rows == 96 and (table.column("radius").to_numpy() >= 0).all()

    # The field's curve from the radii: non-increasing, a lower bound on the exact certificate
    # at each attacked eps (radii are rounded down), and 0 past every radius.
    radii = table.column("radius").to_numpy()
    curve = certified_curve(out, eps_max=1.5 * radii.max() + 0.01, points=60)
    accs = [a for _, a in curve]
    assert all(b <= a for a, b in zip(accs, accs[1:])) and accs[-1] == 0.0
    for e in (0.02, 0.05):
        at = certified_curve(out, eps_max=e, points=1)[0]
        assert at[0] == pytest.approx(e) and at[1] <= cert[e]["certified_accuracy"]
        assert at[1] == pytest.approx((radii >= e).mean())

    # A row that shows a certified sample misclassified must fail the evaluation loudly.
    from dundi.evaluation.results import read_results

    rows = read_results(out)
    certified_ids = table.column("sample_id").to_numpy()[table.column("certified@0.02").to_numpy()]
    sid = rows.column("sample_id").to_numpy()
    victim = np.flatnonzero(np.isin(sid, certified_ids) & (rows.column("eps").to_numpy() == 0.02))[0]
    adv = rows.column("dundi_adv").to_numpy().copy()
    adv[victim] = (adv[victim] + 1) % 10
    forged = rows.set_column(rows.schema.get_field_index("dundi_adv"), "dundi_adv", pa.array(adv))
    with pytest.raises(DundiError, match="soundness violation"):
        check_certificates(forged, table)


def test_classify_gives_per_image_radii_that_hold(certified_run, data_dir):
    from dundi.run.pipeline import classify_split

    figures = classify_split(certified_run, TwoStepRule(10, 3, 5), data_dir=data_dir, limit=50, radii=True)
    radius = np.array(figures["certified_radius"])
    labels = np.array(figures["labels"])
    assert len(radius) == len(labels) == 50 and (radius > 0).any()
    run = Run.load(certified_run)
    x, _, _ = load_split("mnist-10k", "test", data_dir, limit=50)
    cert = run.certifier(TwoStepRule(10, 3, 5))
    inside = radius > 0
    # each reported radius is certified for the answered label (rounded down to 6 decimals)
    assert cert.certified_at(torch.from_numpy(x[inside]), torch.from_numpy(labels[inside]),
                             torch.from_numpy(radius[inside])).all()
