"""The linear verifier (``dundi certify --verifier linear``): backward linear bounds through the
served body, checked against what the float32 network as served computes.

- Its bounds contain g·h for every float32 body output h the network computes -- layer by layer
  as served and as plain torch modules, in batches of several sizes -- at corners and random
  points of random boxes (eps 0 included, where only the rounding allowance keeps them
  sound), for every layer kind it accepts and for the cnn-ibp, cnn-ibp-medium and cnn7 bodies.
- Its certified answers survive the served-path attacks of tests/test_served_certificate.py.
- It is never weaker than the interval verifier: every margin at least as large.
- What it cannot bound is refused in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dundi.errors import DundiError
from dundi.nets.bounds import served_layers, split_last_linear
from dundi.nets.models import build_distance_net
from dundi.robustness.certificate import RADIUS_STEPS, Certifier, served_x_box
from dundi.robustness.linear_bounds import LinearVerifier
from dundi.rule.params import TwoStepRule
from dundi.run.directory import Run
from tests.rule_helpers import index_of
from tests.test_served_certificate import M, N, assert_no_point_flips, ball_points


def small_bodies() -> dict[str, tuple[list[nn.Module], tuple[int, ...]]]:
    """Bodies of every accepted layer kind (Linear, Conv2d strided and padded, ReLU, Flatten,
    Identity) and the certified backbones with their Embedding hidden layer."""
    torch.manual_seed(0)
    mlp = [nn.Flatten(), nn.Linear(72, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU()]
    conv = [nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Identity(),
            nn.Conv2d(5, 6, 4, stride=2, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
            nn.Linear(54, 20), nn.ReLU(), nn.Linear(20, 12)]   # ends on an affine layer
    out = {"mlp": (mlp, (2, 6, 6)), "conv": (conv, (2, 6, 6))}
    for arch in ("cnn-ibp", "cnn-ibp-medium", "cnn7"):   # on 16x16 inputs: the same layers, smaller
        net = build_distance_net(arch, (1, 16, 16)).eval()
        out[arch] = (split_last_linear(net)[0], (1, 16, 16))
    return out


BODIES = small_bodies()


def served_outputs(body: list[nn.Module], points: np.ndarray) -> list[np.ndarray]:
    """float32 body outputs of ``points`` as served (layer by layer, Linear batch-invariant)
    and as plain torch float32 modules in batches of 1, 5 and all: every order a server uses."""
    layers = served_layers(body)
    x = torch.from_numpy(points)
    outs = []
    h = x
    for sl in layers:
        h = sl(h)
    outs.append(h.double().numpy())
    plain = nn.Sequential(*body).float()
    for size in (1, 5, len(points)):
        outs.append(torch.cat([plain(x[i:i + size]) for i in range(0, len(x), size)]).double().numpy())
    return outs


def box_points(x: np.ndarray, eps: float, count: int, seed: int) -> np.ndarray:
    """Corners and random points of the ball (float32, inside it): as the attacks pick them."""
    return ball_points(x, eps, count, seed) if eps > 0 else np.repeat(x[None], 2, 0)


@torch.no_grad()
@pytest.mark.parametrize("name", list(BODIES))
def test_linear_bounds_contain_every_served_output(name):
    body, shape = BODIES[name]
    verifier = LinearVerifier(served_layers(body))
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (2, *shape)).astype(np.float32)
    count = 6 if name == "cnn7" else 12
    tighter = 0
    for eps in (0.0, 1e-3, 0.02, 0.3):
        lo, hi = served_x_box(torch.from_numpy(images), eps)
        h_lo, h_hi, box = verifier.forward(lo.float(), hi.float())
        g = torch.from_numpy(rng.standard_normal((len(images), 6, h_lo.shape[1])))
        lower = box.lower(g, torch.ones(g.shape[:2], dtype=torch.bool)).numpy()
        interval = (torch.where(g > 0, h_lo.double()[:, None], h_hi.double()[:, None]) * g).sum(2).numpy()
        tighter += int((lower > interval).sum())
        for i, x in enumerate(images):
            pts = box_points(x, eps, count, seed=i)
            for h in served_outputs(body, pts):
                assert (h >= h_lo[i].double().numpy()).all() and (h <= h_hi[i].double().numpy()).all()
                values = h @ g[i].numpy().T                                   # (points, specs)
                assert (values >= lower[i]).all(), (f"{name} eps {eps}: a served output below its linear "
                                                    f"bound by {(lower[i] - values).max():.3g}")
    assert tighter > 0, f"{name}: the linear bounds never beat the interval ones: the test proves nothing new"


@pytest.fixture(scope="module")
def certified(certified_run, digits_600):
    return Run.load(certified_run), digits_600


@pytest.fixture(scope="module")
def digits_600(data_dir) -> tuple[np.ndarray, np.ndarray]:
    from dundi.data import load_split

    x, y, _ = load_split("mnist-10k", "test", data_dir, limit=600)
    return x, y


@pytest.mark.realdata
def test_linear_certificates_survive_the_served_path_attacks(certified):
    run, (x, _) = certified
    x = x[:96]
    rule = TwoStepRule(N, M, 3)
    labels = run.classify(x, TwoStepRule(m=M, k=3)).labels
    args = torch.from_numpy(x), torch.from_numpy(labels)
    linear = run.certifier(rule, "linear").radius(*args, eps_max=0.25).numpy()
    interval = run.certifier(rule).radius(*args, eps_max=0.25).numpy()
    assert (linear >= interval - 0.25 / 2 ** RADIUS_STEPS).all()
    assert assert_no_point_flips(run, x, labels, linear, N, M, 3) >= 8


@pytest.mark.realdata
@torch.no_grad()
def test_the_linear_verifier_is_never_weaker_than_the_interval_one(certified):
    """Every margin of every condition (the rule's two steps, the abstain gate, the selective
    signals) is at least the interval verifier's, so every interval-certified image is
    linear-certified; and somewhere it is strictly larger."""
    from dundi.robustness.certificate import AbstainGate

    run, (x, y) = certified
    x, y = torch.from_numpy(x[:200]), torch.from_numpy(y[:200]).long()
    rule = TwoStepRule(N, M, 3)
    pair = run.certifier(rule), run.certifier(rule, "linear")
    gate = AbstainGate(abstain_max_mean=0.4, abstain_min_margin=0.0)
    strictly = 0
    for eps in (0.02, 0.06, 0.1, 0.15):
        for g in (None, gate):
            interval, linear = (c._slack(x, y, eps, g) for c in pair)
            assert (linear >= interval).all()
            strictly += int((linear > interval).sum())
            assert ((interval > 0).all(1) <= (linear > 0).all(1)).all()
    assert strictly > 0, "the linear verifier never tightened a margin: the comparison checks nothing"


def test_what_the_linear_verifier_cannot_bound_is_refused_in_one_line():
    net = build_distance_net("lenet1", (1, 28, 28)).eval()     # max pooling: no rule here
    index = index_of(torch.randn(10, 4, net.embed_dim), "sqeuclidean")
    rule = index.resolve(TwoStepRule(4, 2, 3))
    with pytest.raises(DundiError, match=r"does not support the layer torch\.nn\.modules\.pooling\.MaxPool2d") as err:
        Certifier(net, index, rule, verifier="linear")
    assert "\n" not in str(err.value) and "--verifier interval" in str(err.value)
    Certifier(net, index, rule)               # the interval verifier takes it
    with pytest.raises(DundiError, match="unknown verifier 'crown'"):
        Certifier(build_distance_net("cnn-ibp", (1, 28, 28)), index, rule, verifier="crown")
