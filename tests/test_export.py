"""DunDi as a plain module: the exported TorchScript file loads with torch alone, its argmax is
Algorithm 1 (ties included, clean and adversarial images), it carries a certified run's
metadata, an outside AutoAttack on it agrees with `dundi evaluate`, and bad requests are
refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from dundi.data import load_split
from dundi.rule.exact import ExactRule
from dundi.rule.params import TwoStepRule
from dundi.rule.reference import two_step_reference
from dundi.run.directory import Run
from dundi.run.export import META_NAME, DunDiModule
from rule_helpers import resolved

LOAD_WITH_TORCH_ONLY = """
import sys, json
sys.modules["dundi"] = None  # importing dundi would fail: the file must not need it
import numpy as np, torch
m = torch.jit.load(sys.argv[1])
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    print(json.dumps(m(x).argmax(1).tolist()))
"""


def _torch_only_labels(path, images: np.ndarray, tmp_path) -> np.ndarray:
    np.save(tmp_path / "x.npy", np.asarray(images, np.float32))
    out = subprocess.run([sys.executable, "-c", LOAD_WITH_TORCH_ONLY, str(path), str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return np.array(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
def test_argmax_is_algorithm_1_with_ties(metric):
    """Oracles built so that classes tie exactly in step 1 and in step 2 (duplicated classes,
    duplicated oracles): the module's argmax is the rule's label for every rule, and for the
    squared Euclidean distance the exact rule's (the served path's)."""
    rng = np.random.default_rng(0)
    base = rng.integers(-3, 4, (6, 5, 4)).astype(np.float32)  # small integers: exact arithmetic
    oracles = np.concatenate([base, base[[1, 4]]])               # classes 6, 7 tie with 1, 4
    z = np.concatenate([rng.integers(-3, 4, (40, 4)), oracles[:, 0], oracles.mean(1).round()]).astype(np.float32)
    for n, m, k in [(5, 3, 3), (5, 1, 8), (4, 2, 1), (3, 3, 5)]:
        rule = resolved(oracles, TwoStepRule(n, m, k), metric)
        module = DunDiModule([nn.Flatten(), nn.Linear(4, 4)], oracles, rule).eval()
        with torch.no_grad():  # an identity Linear layer: exercises its 1x1-convolution form
            module.net[1].weight.copy_(torch.eye(4)[:, :, None, None])
            module.net[1].bias.zero_()
        module = torch.jit.script(module)
        x = torch.from_numpy(z).reshape(len(z), 1, 1, 4)
        with torch.no_grad():
            got = module(x).argmax(1).numpy()
        np.testing.assert_array_equal(got, two_step_reference(torch.from_numpy(z), torch.from_numpy(oracles[:, :n]),
                                                              rule).numpy())
        if metric == "sqeuclidean":
            np.testing.assert_array_equal(got, ExactRule(oracles, rule).classify(z).labels)
        scores = module(x)
        top2 = scores.topk(2, dim=1).values
        assert bool((top2[:, 0] > top2[:, 1]).all()), "the label must be the one strict maximum"


@pytest.mark.realdata
def test_exported_certified_run_answers_as_run_classify(certified_run, data_dir, tmp_path):
    from dundi.cli.main import main

    out = tmp_path / "dundi.pt"
    assert main(["export", str(certified_run), "--out", str(out), "--n", "10", "--k", "5"]) == 0
    extra = {META_NAME: ""}
    torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra[META_NAME])
    assert meta["rule"] == {"n": 10, "m": 3, "k": 5, "metric": "sqeuclidean"}
    assert meta["certificate"]["cert_eps"] == 0.1 and meta["certificate"]["norm"] == "Linf"
    assert "/" not in json.dumps({k: v for k, v in meta.items() if k != "input"}).replace("N, C, H, W", "")

    run = Run.load(certified_run)
    rule = TwoStepRule(10, 3, 5)
    images, labels, _ = load_split("mnist-10k", "test", data_dir)
    images = images[:400]
    np.testing.assert_array_equal(_torch_only_labels(out, images, tmp_path), run.classify(images, rule).labels)

    # adversarial images (PGD on the module itself, many of them near a decision boundary)
    from dundi.attacks import make_attack

    module = run.as_module(rule)
    x, y = torch.from_numpy(np.array(images[:48], np.float32)), torch.from_numpy(np.array(labels[:48], np.int64))
    adv = make_attack("pgd", module, eps=0.2, steps=10, alpha=0.02, loss="margin", seed=0).run(x, y).adv
    with torch.no_grad():
        mine = module(adv).argmax(1).numpy()
    np.testing.assert_array_equal(mine, run.classify(adv.numpy(), rule).labels)
    np.testing.assert_array_equal(_torch_only_labels(out, adv.numpy(), tmp_path), mine)
    assert (mine != y.numpy()).mean() > 0.1  # the attack moved some across a boundary


@pytest.mark.realdata
def test_exported_euclidean_run_answers_as_run_classify(mnist_runs, data_dir):
    run = Run.load(mnist_runs["dundi"])
    images, _, _ = load_split("mnist-10k", "test", data_dir)
    module = run.as_module()
    with torch.no_grad():
        got = module(torch.from_numpy(np.array(images[:400], np.float32))).argmax(1).numpy()
    np.testing.assert_array_equal(got, run.classify(images[:400]).labels)


@pytest.mark.realdata
def test_bad_exports_are_refused_in_one_line(mnist_runs, tmp_path, capsys):
    import shutil

    from dundi.cli.main import main

    bare = tmp_path / "bare"
    shutil.copytree(mnist_runs["dundi"], bare, ignore=shutil.ignore_patterns("oracle"))
    meta = json.loads((bare / "run.json").read_text())
    meta["files"] = {k: v for k, v in meta["files"].items() if not k.startswith("oracle")}
    meta.pop("oracle", None)
    (bare / "run.json").write_text(json.dumps(meta))
    cases = [([str(bare), "--out", str(tmp_path / "a.pt")], "no oracle index"),
             ([str(mnist_runs["dundi"]), "--out", str(tmp_path / "missing" / "a.pt")], "does not exist"),
             ([str(mnist_runs["dundi"]), "--out", str(tmp_path)], "is a directory"),
             ([str(mnist_runs["native"]), "--out", str(tmp_path / "a.pt")], "native run")]
    for argv, words in cases:
        capsys.readouterr()
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.realdata
def test_torchattacks_autoattack_on_the_export_agrees_with_dundi_evaluate(certified_run, data_dir, tmp_path):
    """torchattacks' standard AutoAttack on the exported module and `dundi evaluate --attacks
    autoattack` on the same 24 images at L∞ eps 0.3: the outside tool's robust accuracy, every
    adversarial image judged by the served rule (Run.classify), lies in the 95% interval of ours."""
    torchattacks = pytest.importorskip("torchattacks")
    from dundi.evaluation.config import EvalConfig
    from dundi.evaluation.evaluate import evaluate_local
    from dundi.evaluation.shard import Evaluator
    from dundi.evaluation.results import read_results, wilson_interval

    cfg = EvalConfig(run=str(certified_run), attacks=["autoattack"], threats=["adaptive"], eps=[0.3], limit=24,
                     shard_size=12, n=10, k=5, n_values=[10], data_dir=data_dir)
    evaluate_local(cfg, tmp_path / "ours", progress=False, log=lambda s: None, threads=2)
    rows = read_results(tmp_path / "ours", require_complete=True).to_pylist()
    ours = sum(r["dundi_clean"] == r["label"] and r["dundi_adv"] == r["label"] for r in rows)

    images, labels, _ = Evaluator.load_samples(cfg, "mnist-10k")
    run = Run.load(certified_run)
    rule = TwoStepRule(10, 3, 5)
    path = tmp_path / "dundi.pt"
    from dundi.run.export import export_run

    export_run(run, path, rule)
    module = torch.jit.load(str(path)).eval()
    x, y = torch.from_numpy(np.array(images, np.float32)), torch.from_numpy(np.array(labels, np.int64))
    adv = torchattacks.AutoAttack(module, norm="Linf", eps=0.3, version="standard", n_classes=10, seed=0)(x, y).detach()
    assert float((adv - x).abs().max()) <= 0.3 + 1e-6
    served_adv = run.classify(adv.numpy(), rule).labels
    with torch.no_grad():
        np.testing.assert_array_equal(module(adv).argmax(1).numpy(), served_adv)
    served_clean = run.classify(images, rule).labels
    theirs = int(((served_clean == labels) & (served_adv == labels)).sum())
    low, high = wilson_interval(ours, len(rows))
    assert low <= theirs / len(rows) <= high, (ours, theirs, len(rows))
