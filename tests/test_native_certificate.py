"""The softmax IBP baseline (``train-native --certified``) and its certificate, checked the
way certified DunDi's is: bounds against every sampled float32 output of the served network,
and certified answers attacked through the served path (``Run.classify``, mixed batches)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dundi.errors import DundiError
from dundi.nets.bounds import input_box, propagate, split_last_linear
from dundi.nets.models import NativeNet
from dundi.robustness.native_certificate import SoftmaxCertifier
from dundi.rule.params import TwoStepRule
from dundi.run.directory import Run
from dundi.run.pipeline import certify_split
from dundi.training.certified import softmax_worst_case_logits
from tests.test_certificate import box_samples
from tests.test_served_certificate import ball_points, to_ball


def tiny_native(seed: int, kind: str) -> NativeNet:
    """A softmax network on 1×4×4 inputs with the layer kinds the served bounds support."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1)]
    if kind == "batchnorm":
        bn = nn.BatchNorm2d(4)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(-1.5, 1.5)
        layers.append(bn)
    layers.append(nn.ReLU())
    layers.append({"maxpool": nn.MaxPool2d(2), "avgpool": nn.AvgPool2d(2)}.get(kind, nn.Identity()))
    layers += [nn.Flatten(), nn.LazyLinear(12), nn.ReLU()]
    features = nn.Sequential(*layers)
    dim = int(features(torch.zeros(1, 1, 4, 4)).shape[1])
    features[-2].weight.data.normal_(0, 0.5)
    return NativeNet(features, dim, 5).eval()


def test_training_worst_case_logits_bound_every_sampled_input():
    net = tiny_native(3, "plain").double()
    body, head = split_last_linear(net)
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        worst = softmax_worst_case_logits(*propagate(body, *input_box(x, 0.1)), head, labels)
        for i in range(len(x)):
            logits = net(box_samples(x[i:i + 1], 0.1, 500, i)[:, 0])
            diff = logits - logits[:, labels[i]:labels[i] + 1]
            assert (diff <= worst[i] + 1e-9).all()
            assert worst[i, labels[i]] == 0


@pytest.mark.parametrize("kind", ["plain", "batchnorm", "maxpool", "avgpool"])
def test_margin_bound_holds_for_every_served_float32_output(kind):
    """The certifier's slack is a lower bound on logit_y − logit_c of what the float32 network
    computes at sampled points and vertices of the ball, in batches of any size; and it
    certifies some images, not none and not all (the check is not vacuous)."""
    net = tiny_native(11, kind)
    certifier = SoftmaxCertifier(net)
    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
        verdicts = []
        for eps in (0.002, 0.02, 0.08):
            slack = certifier._slack(x, y, eps, None)[:, 0].double()
            verdicts.append(slack > 0)
            for i in range(len(x)):
                pts = box_samples(x[i:i + 1].double(), eps, 400, i)[:, 0]  # half of them at vertices
                pts = torch.from_numpy(to_ball(x[i].numpy(), pts.numpy(), eps))  # float32, inside
                size = [1, 3, 16, 64][i % 4]
                logits = torch.cat([net(pts[s:s + size]) for s in range(0, len(pts), size)]).double()
                margin = logits[:, y[i]:y[i] + 1] - logits
                margin[:, y[i]] = torch.inf
                assert (margin.min(1).values >= slack[i]).all(), f"image {i} at eps {eps}"
                if slack[i] > 0:
                    assert (logits.argmax(1) == y[i]).all()
    verdicts = torch.stack(verdicts)
    assert verdicts.any() and not verdicts.all()


def test_a_native_run_has_no_gate_and_no_oracle_rule(certified_native_run):
    run = Run.load(certified_native_run)
    with pytest.raises(DundiError, match="native run"):
        run.certifier(TwoStepRule(n=10))
    certifier = run.certifier()
    from dundi.robustness.certificate import AbstainGate

    x = torch.zeros(1, 1, 28, 28)
    with pytest.raises(DundiError, match="no abstain gate"):
        certifier.certified_at(x, torch.zeros(1, dtype=torch.long), 0.1, AbstainGate(abstain_max_mean=0.5))


@pytest.fixture(scope="module")
def certified_native_run(tmp_path_factory, data_dir) -> Path:
    """The softmax IBP baseline on a real mnist-10k slice, trained as `train-native
    --certified` trains it (a gentle schedule: this slice and budget, ~30 s)."""
    from dundi.run.pipeline import train_native_run
    from dundi.training.config import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "softmax-ibp"
    cfg = TrainConfig("mnist-10k", "cnn-ibp", epochs=8, limit=3000, metric="sqeuclidean", certified=True,
                      cert_eps=0.1, cert_warmup=2.0, cert_ramp=4.0, cert_per_class=10)
    train_native_run(cfg, out, data_dir, progress=False, log=lambda s: None)
    return out


@pytest.mark.realdata
def test_certified_native_answers_survive_attacks_on_the_served_path(certified_native_run, data_dir):
    """Per-image radii of the baseline, then corners, random points and signed-gradient steps
    towards the nearest rival inside each ball, classified by Run.classify in mixed batches:
    no certified answer changes."""
    from dundi.data import load_split

    run = Run.load(certified_native_run)
    assert run.meta["hidden"] == 512 and isinstance(run.model.features[-2], nn.Linear)
    x, y, _ = load_split("mnist-10k", "test", data_dir, limit=64)
    answers = run.classify(x).labels
    radius = run.certifier().batched(x, answers, radius=True)["radius"]
    certified = np.flatnonzero(radius > 0)
    assert len(certified) >= 16, f"only {len(certified)} certified: the check would test nothing"
    pts, owner = [], []
    for i in certified:
        pts.append(ball_points(x[i], float(radius[i]), 24, int(i)))
        owner += [i] * len(pts[-1])
    pts.append(_rival_steps(run.model, x[certified], answers[certified], radius[certified]))
    owner += certified.tolist()
    points, owner = np.concatenate(pts), np.array(owner)
    rng = np.random.default_rng(0)
    got, start = np.empty(len(points), np.int64), 0
    order = rng.permutation(len(points))
    while start < len(points):
        idx = order[start:start + int(rng.choice([1, 2, 7, 16, 33, 64, 256]))]
        got[idx] = run.classify(points[idx]).labels
        start += len(idx)
    assert (got == answers[owner]).all(), f"{int((got != answers[owner]).sum())} certified answers changed"


def _rival_steps(model: nn.Module, x: np.ndarray, labels: np.ndarray, radius: np.ndarray,
                 steps: int = 8) -> np.ndarray:
    """Signed-gradient steps inside each ball lowering the logit margin to the nearest rival."""
    x0 = torch.from_numpy(x.astype(np.float64))
    r = torch.from_numpy(radius)[:, None, None, None]
    y = torch.from_numpy(labels)
    net, adv = model.double(), x0.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        logits = net(adv)
        own = logits.gather(1, y[:, None])
        rival = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), -torch.inf).amax(1, keepdim=True)
        (rival - own).sum().backward()
        with torch.no_grad():
            adv = torch.minimum(torch.maximum(adv + r / 2 * adv.grad.sign(), x0 - r), x0 + r).clamp(0, 1)
    model.float()
    return np.stack([to_ball(x[i], a, float(radius[i])) for i, a in enumerate(adv.detach().numpy())])


@pytest.mark.realdata
def test_certify_on_a_native_run_counts_only_correct_certified_answers(certified_native_run, data_dir):
    figures = certify_split(certified_native_run, eps=[0.01, 0.05], data_dir=data_dir, limit=300)
    assert figures["kind"] == "native" and figures["count"] == 300 and "n" not in figures
    run = Run.load(certified_native_run)
    from dundi.data import load_split

    x, y, _ = load_split("mnist-10k", "test", data_dir, limit=300)
    ok = run.certifier().certified_at(torch.from_numpy(x), torch.from_numpy(y), 0.05).numpy()
    assert figures["certified_accuracy"]["0.05"] == pytest.approx(ok.mean())
    assert 0 < figures["certified_accuracy"]["0.05"] <= figures["certified_accuracy"]["0.01"] <= figures["clean_accuracy"]


def test_certified_training_refuses_a_backbone_it_cannot_bound(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dundi", "train-native", "--model", "vgg16", "--certified",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "vgg16" in out.stderr and "cnn-ibp" in out.stderr


@pytest.mark.realdata
def test_certify_cli_on_a_native_run_prints_its_rule(certified_native_run):
    out = subprocess.run([sys.executable, "-m", "dundi", "certify", str(certified_native_run), "--eps", "0.05",
                          "--limit", "100", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["rule"] == "argmax of the logits" and 0 < figures["certified_accuracy"]["0.05"] <= 1


# ---- oracles chosen for certified margin (dundi index build --select-eps) ---------------------

def test_herding_picks_distinct_rows_that_approach_the_target():
    from dundi.robustness.margin_oracles import _herd

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 4, generator=g, dtype=torch.float64)
    one = _herd(emb, emb[17], (emb[17] ** 2).sum(), 1)
    assert one.tolist() == [17]  # a target that is one pool point is that point
    subset = [3, 9, 21, 40]
    target = emb[subset].mean(0), (emb[subset] ** 2).sum(1).mean()
    picked = _herd(emb, *target, 4)
    assert len(set(picked.tolist())) == 4
    err = lambda rows: float((emb[rows].mean(0) - target[0]).norm())
    rand = [err(np.random.default_rng(s).choice(50, 4, replace=False)) for s in range(200)]
    assert err(picked) < np.quantile(rand, 0.05)  # far closer than random picks


@pytest.mark.realdata
def test_margin_chosen_oracles_are_training_images_of_their_class(certified_run, mnist_runs, data_dir,
                                                                  tmp_path):
    import shutil

    from dundi.data import load_split
    from dundi.run.pipeline import build_index

    run_dir = tmp_path / "margin"
    shutil.copytree(certified_run, run_dir)
    small = {"pool": 40, "fit_images": 200, "steps": 20}  # the full fit takes minutes
    index = build_index(run_dir, n=10, seed=0, data_dir=data_dir, margin_eps=0.1, **small)
    assert index.meta["select"] == "margin" and index.meta["select_eps"] == 0.1
    ids = np.array(index.meta["ids"]).reshape(index.num_classes, 10)
    assert len(np.unique(ids)) == ids.size
    _, labels, all_ids = load_split("mnist-10k", "train", data_dir, limit=3000)
    label_of = dict(zip(all_ids.tolist(), labels.tolist()))
    assert all(label_of[int(i)] == c for c in range(index.num_classes) for i in ids[c])
    again = build_index(run_dir, n=10, seed=0, data_dir=data_dir, margin_eps=0.1, **small)
    assert again.meta["ids"] == index.meta["ids"]  # seeded: the same oracles every time
    with pytest.raises(DundiError, match="certified run"):  # a Euclidean (uncertified) run
        build_index(mnist_runs["dundi"], n=10, seed=0, data_dir=data_dir, margin_eps=0.1)
