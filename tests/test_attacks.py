"""dundi.attacks: invariants of every attack on a small CNN trained here in about a second.

The data are 10 classes of noisy, shifted blocky prototypes (28x28, many pixels exactly 0
or 1 like MNIST), learnable to ~100% so that the attacks have something real to fool.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dundi.attacks import (
    BIM,
    BIMA,
    BIMB,
    FGSM,
    JSMA,
    PGD,
    AttackCheckWarning,
    AttackResult,
    DeepFool,
    Square,
    check_black_box_vs_white_box,
    check_gradients,
    check_outputs,
    make_attack,
    run_checks,
)
from dundi.attacks.jsma import best_pixel_pairs

K = 10


# ----------------------------------------------------------------------------- fixtures

def make_data(n: int, seed: int, k: int = K, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy, shifted, rescaled copies of k fixed blocky prototypes; float32 NCHW in [0, 1]."""
    cells = size // 4
    protos = (np.random.default_rng(1234).random((k, cells, cells)) < 0.3).astype(np.float32)
    protos = protos.repeat(4, 1).repeat(4, 2)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    shifts = rng.integers(-2, 3, (n, 2))
    x = np.stack([np.roll(protos[c], tuple(s), (0, 1)) for c, s in zip(y, shifts)])
    x = x * rng.uniform(0.6, 1.0, (n, 1, 1)) + rng.normal(0, 0.15, x.shape)
    return torch.from_numpy(np.clip(x, 0, 1).astype(np.float32)[:, None]), torch.from_numpy(y.astype(np.int64))


def make_net(k: int = K) -> nn.Module:
    """LeNet-like: two conv/pool blocks, one hidden dense layer; returns logits."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 12, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12 * 49, 32), nn.ReLU(), nn.Linear(32, k),
    )


@functools.lru_cache(maxsize=None)
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(net in eval mode, 32 test images it classifies correctly, their labels).

    Cached per process, shared with test_attacks_reference.py; the global RNG is left alone.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        x, y = make_data(1200, seed=0)
        net = make_net()
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        for idx in torch.randperm(len(x)).split(32):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval().zero_grad(set_to_none=True)
    xt, yt = make_data(64, seed=5)
    with torch.no_grad():
        ok = net(xt).argmax(1) == yt
    assert ok.float().mean() > 0.9, "the test net did not learn the synthetic data"
    return net, xt[ok][:32].contiguous(), yt[ok][:32].contiguous()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models and batches: one intra-op thread is as fast and does not fight the
    other test processes on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def subject():
    """The cached trained net, with no parameter gradients left by another module's reference
    attacks (torchattacks backpropagates into the parameters)."""
    net, x, y = trained()
    net.zero_grad(set_to_none=True)
    return net, x, y


@pytest.fixture(scope="module")
def ta():
    """torchattacks 3.5.1, the independent reference (installed with --no-deps by `make setup`)."""
    import torchattacks

    return torchattacks


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


class NearestCentroid(nn.Module):
    """Scores that are not logits: minus the Euclidean distance to each class mean image
    (larger = more likely), like DunDi's similarity scores. Has buffers, no parameters."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, k: int):
        super().__init__()
        self.register_buffer("centroids", torch.stack([x[y == c].mean(0) for c in range(k)]).flatten(1))

    def forward(self, x):
        return -torch.cdist(x.flatten(1), self.centroids)


class NoBackward(torch.autograd.Function):
    """Identity whose backward raises: proves an attack never differentiates."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise AssertionError("backward called")


class NoGradModel(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.net(NoBackward.apply(x))


# -------------------------------------------------------------------------- registry

def test_registry_and_paper_defaults(subject):
    # what each attack declares (norm, budget, steps, seeding) is checked by running it, in
    # test_attacks_metadata.py; here: the paper's MNIST settings are the defaults
    net, _, _ = subject
    a = make_attack("fgsm", net)
    assert isinstance(a, FGSM) and a.eps == 0.3
    a = make_attack("ifgsm-a", net)
    assert isinstance(a, BIMA) and (a.eps, a.alpha, a.steps, a.early_stop) == (0.3, 0.01, 50, True)
    a = make_attack("ifgsm-b", net)
    assert isinstance(a, BIMB) and (a.eps, a.alpha, a.steps, a.early_stop) == (0.3, 0.01, 50, False)
    a = make_attack("pgd", net)
    assert (a.eps, a.alpha, a.steps, a.restarts, a.random_start) == (0.3, 0.01, 50, 1, True)
    a = make_attack("jsma", net, eps=0.1, steps=7, seed=3)  # eps and steps ignored
    assert (a.theta, a.gamma, a.target, a.seed) == (1.0, 0.1, "random", 3) and not hasattr(a, "eps")
    a = make_attack("deepfool", net, eps=0.1, steps=7)
    assert (a.overshoot, a.max_iter) == (0.02, 7) and not hasattr(a, "eps")
    a = make_attack("square", net)
    assert (a.eps, a.n_queries) == (0.3, 1000)
    a = make_attack("pgd", net, eps=0.05, steps=5, seed=2, alpha=0.005, restarts=3, loss="margin")
    assert (a.eps, a.steps, a.seed, a.alpha, a.restarts, a.loss) == (0.05, 5, 2, 0.005, 3, "margin")
    assert make_attack("square", net, steps=10).n_queries == 10
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("cw", net)


# ------------------------------------------------------------- common invariants

LINF = {
    "fgsm": lambda m: FGSM(m, eps=0.3),
    "ifgsm-a": lambda m: BIMA(m, eps=0.3, alpha=0.03, steps=15),
    "ifgsm-b": lambda m: BIMB(m, eps=0.3, alpha=0.03, steps=15),
    "pgd": lambda m: PGD(m, eps=0.3, alpha=0.03, steps=15),
    "pgd-margin": lambda m: PGD(m, eps=0.3, alpha=0.03, steps=15, loss="margin", restarts=2),
    "square": lambda m: Square(m, eps=0.3, n_queries=300),
}


@pytest.mark.parametrize("name", sorted(LINF))
def test_linf_attacks_respect_budget_and_fool(subject, name):
    net, x, y = subject
    res = LINF[name](net).run(x, y)
    assert isinstance(res, AttackResult)
    adv = res.adv
    assert adv.shape == x.shape and adv.dtype == torch.float32 and not adv.requires_grad
    assert (adv - x).abs().max() <= 0.3 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert res.steps.shape == (len(x),) and res.steps.dtype == torch.int64 and (res.steps >= 1).all()
    assert accuracy(net, adv, y) <= 0.2  # clean accuracy is 1.0 on these samples


def test_forward_returns_the_adversarial_images_of_run(subject):
    net, x, y = subject
    attack = BIMB(net, steps=5, alpha=0.05)
    assert torch.equal(attack(x, y), attack.run(x, y).adv)


def test_model_mode_and_parameter_grads_untouched(subject):
    net, x, y = subject
    model = nn.Sequential(net, nn.Dropout(0.5))  # dropout would make the attack random
    model.train()
    net.eval()  # a mixed state must come back as it was
    before = [m.training for m in model.modules()]
    for attack in (FGSM(model), BIMA(model, steps=3), PGD(model, steps=2), JSMA(model, gamma=0.01),
                   DeepFool(model, max_iter=2), Square(model, n_queries=5)):
        a1, a2 = attack(x[:4], y[:4]), attack(x[:4], y[:4])
        assert torch.equal(a1, a2), f"{type(attack).__name__} ran the model in train mode"
        assert [m.training for m in model.modules()] == before
    assert all(p.grad is None for p in model.parameters())
    net.eval()


def test_input_validation(subject):
    net, x, y = subject
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FGSM(net)(x * 255, y)
    with pytest.raises(ValueError, match="labels must have shape"):
        FGSM(net)(x, y[:-1])
    with pytest.raises(ValueError, match="labels must be in"):
        DeepFool(net)(x, y + K)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        FGSM(net)(x[0], y[:1])


# --------------------------------------------------------------------------- BIM

def test_bim_a_stops_at_first_misclassified_iterate(subject):
    net, x, y = subject
    eps, alpha, steps = 0.3, 0.01, 50
    res = BIMA(net, eps=eps, alpha=alpha, steps=steps).run(x, y)
    s = res.steps
    assert ((s >= 1) & (s <= steps)).all()
    assert len(s.unique()) > 1, "all samples stopped at once: the test cannot tell"
    # Reference: the plain BIM trajectory, written out; per sample the first
    # misclassified iterate (iterates 1..steps) and the one before it.
    it, first = x.clone(), torch.zeros_like(y)
    iterates = [x.clone()]
    for k in range(1, int(s.max()) + 1):
        it.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(it), y, reduction="sum"), it)
        it = torch.min(torch.max(it.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
        iterates.append(it.clone())
        with torch.no_grad():
            first[(first == 0) & (net(it).argmax(1) != y)] = k
    stopped = s < steps
    assert torch.equal(s[stopped], first[stopped])
    rows = torch.arange(len(y))
    traj = torch.stack(iterates)  # (steps + 1, N, C, H, W)
    assert torch.equal(res.adv[stopped], traj[s, rows][stopped])
    assert accuracy(net, traj[s - 1, rows], y) == 1.0  # the iterate before each stop was correct
    assert accuracy(net, res.adv[stopped], y[stopped]) == 0.0


def test_bim_b_runs_all_steps_and_differs_from_bim_a(subject):
    net, x, y = subject
    b = BIM(net, steps=20, alpha=0.01).run(x, y)
    a = BIM(net, steps=20, alpha=0.01, early_stop=True).run(x, y)
    assert (b.steps == 20).all() and (a.steps <= 20).all()
    # Early-stopped samples have smaller perturbations than the full-length ones.
    stopped = a.steps < 20
    assert stopped.any()
    assert ((a.adv - x)[stopped].abs().sum() < (b.adv - x)[stopped].abs().sum())


# --------------------------------------------------------------------------- PGD

def test_pgd_restarts_keep_the_best_restart(subject):
    net, x, y = subject
    one = PGD(net, eps=0.08, alpha=0.02, steps=5, seed=1).run(x, y)
    many = PGD(net, eps=0.08, alpha=0.02, steps=5, restarts=4, seed=1).run(x, y)
    with torch.no_grad():
        fooled1 = net(one.adv).argmax(1) != y
        fooled4 = net(many.adv).argmax(1) != y
    assert 0 < fooled1.sum() < len(y), "eps must leave some samples unfooled for this test"
    assert (fooled4 | ~fooled1).all(), "a restart lost a sample the first restart had fooled"
    assert fooled4.sum() >= fooled1.sum()
    # Fooled by the first restart: not attacked again. Others: 4 restarts of 5 steps.
    assert (many.steps[fooled1] == 5).all() and (many.steps[~fooled4] == 20).all()
    assert (many.adv - x).abs().max() <= 0.08 + 1e-6


def test_pgd_l2_budget(subject):
    net, x, y = subject
    adv = PGD(net, eps=3.0, alpha=0.5, steps=10, norm="l2").run(x, y).adv
    assert (adv - x).flatten(1).norm(dim=1).max() <= 3.0 + 1e-4
    assert accuracy(net, adv, y) < 0.5


def test_pgd_is_seeded_and_leaves_the_global_rng_alone(subject):
    net, x, y = subject
    state = torch.get_rng_state()
    a1 = PGD(net, steps=2, seed=7)(x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a1, PGD(net, steps=2, seed=7)(x, y))
    assert not torch.equal(a1, PGD(net, steps=2, seed=8)(x, y))


# -------------------------------------------------------------------------- JSMA

def test_jsma_random_targets_l0_budget_and_success(subject):
    net, x, y = subject
    gamma = 0.1
    res = JSMA(net, theta=1.0, gamma=gamma, seed=0).run(x, y)
    d = x[0].numel()
    assert (res.target != y).all() and res.target.min() >= 0 and res.target.max() < K
    l0 = (res.adv != x).flatten(1).sum(1)
    assert (l0 <= gamma * d).all() and (l0 <= 2 * res.steps).all()
    assert (res.steps <= math.floor(gamma * d / 2)).all()
    assert (res.adv >= x).all() and res.adv.max() <= 1  # theta > 0 only increases pixels
    with torch.no_grad():
        hit = net(res.adv).argmax(1) == res.target
    assert hit.float().mean() >= 0.6
    # A sample that reached its target stopped there: one pair fewer did not reach it.
    assert (res.steps[hit] >= 1).all()


def test_jsma_targets_seeded_or_given(subject):
    net, x, y = subject
    a = JSMA(net, gamma=0.02, seed=1).run(x, y)
    b = JSMA(net, gamma=0.02, seed=1).run(x, y)
    c = JSMA(net, gamma=0.02, seed=2).run(x, y)
    assert torch.equal(a.target, b.target) and torch.equal(a.adv, b.adv)
    assert not torch.equal(a.target, c.target)
    counts = torch.bincount(JSMA(net, seed=0)._targets(torch.zeros(5000, dtype=torch.long), K), minlength=K)
    assert counts[0] == 0 and (counts[1:] > 400).all()  # uniform over the other classes
    given = (y + 3) % K
    r = JSMA(net, gamma=0.02, target=given).run(x, y)
    assert torch.equal(r.target, given)
    with pytest.raises(ValueError, match="target must have shape"):
        JSMA(net, target=given[:3]).run(x, y)


def test_jsma_logit_space_and_decreasing_theta(subject):
    net, x, y = subject
    x, y = x[:12], y[:12]
    res = JSMA(net, space="logits", gamma=0.1).run(x, y)
    with torch.no_grad():
        assert (net(res.adv).argmax(1) == res.target).float().mean() >= 0.3
    neg = JSMA(net, theta=-1.0, gamma=0.05).run(x, y)
    assert (neg.adv <= x).all() and ((neg.adv != x).flatten(1).sum(1) <= 0.05 * x[0].numel()).all()


def test_best_pixel_pairs_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for n, d, p_in in [(8, 50, 0.8), (8, 300, 0.5), (8, 784, 0.9), (8, 40, 0.05), (8, 6, 0.9)]:
        a, c = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        a[0] = a[0].abs()  # every pair admissible on the a side
        c[1] = -c[1].abs()  # no admissible pair in row 1
        c[2] = a[2]  # the softmax case: one chain, two candidates
        c[3] = -a[3] + 0.01 * c[3]  # near anti-diagonal: every pixel on the front
        a[4], c[4] = a[4].round(), c[4].round()  # many exact duplicates and ties
        a[5, : d // 2], c[5, : d // 2] = 0.0, 0.0  # dead pixels
        dom = torch.rand(n, d, generator=g) < p_in
        score, p, q = best_pixel_pairs(a, c, dom)
        aa, cc = a.masked_fill(~dom, float("-inf")), c.masked_fill(~dom, 0)
        full = (aa[:, :, None] + aa[:, None]).clamp(min=0) * (cc[:, :, None] + cc[:, None]).clamp(min=0)
        full.diagonal(dim1=1, dim2=2).zero_()
        torch.testing.assert_close(score, full.flatten(1).amax(1))
        assert score[1] == 0
        ok = score > 0
        rows = torch.arange(n)
        assert (p != q)[ok].all() and dom[rows, p][ok].all() and dom[rows, q][ok].all()
        assert torch.equal(full[rows, p, q], score)


# ---------------------------------------------------------------------- DeepFool

def test_deepfool_flips_labels_with_small_l2(subject):
    net, x, y = subject
    x, y = x[:16], y[:16]
    res = DeepFool(net, overshoot=0.02, max_iter=50).run(x, y)
    assert accuracy(net, res.adv, y) <= 0.1
    assert (res.steps >= 1).all() and (res.steps <= 50).all()
    l2 = (res.adv - x).flatten(1).norm(dim=1)
    l2_fgsm = (FGSM(net, eps=0.3)(x, y) - x).flatten(1).norm(dim=1)
    assert l2.median() < 0.5 * l2_fgsm.median()
    assert res.adv.min() >= 0 and res.adv.max() <= 1


def test_deepfool_leaves_misclassified_samples_alone(subject):
    net, x, y = subject
    wrong = (y + 1) % K  # every sample is "misclassified" w.r.t. these labels
    res = DeepFool(net).run(x, wrong)
    assert torch.equal(res.adv, x) and (res.steps == 0).all()


# ------------------------------------------------------------------------ Square

def test_square_uses_no_gradients(subject):
    net, x, y = subject
    model = NoGradModel(net)
    with pytest.raises(AssertionError, match="backward called"):  # the wrapper does bite
        FGSM(model)(x[:2], y[:2])
    model.forwards = 0
    res = Square(model, eps=0.3, n_queries=200, seed=0).run(x, y)
    assert model.forwards <= 201
    assert (res.steps <= 200).all() and (res.adv - x).abs().max() <= 0.3 + 1e-6
    assert accuracy(net, res.adv, y) <= 0.2
    with torch.no_grad():  # also fine inside the caller's no_grad
        again = Square(model, eps=0.3, n_queries=200, seed=0)(x, y)
    assert torch.equal(again, res.adv)


# --------------------------------------------------------------- non-logit scores

def test_attacks_on_scores_that_are_not_logits():
    x, y = make_data(400, seed=1)
    model = NearestCentroid(x, y, K).eval()
    xt, yt = make_data(16, seed=2)
    assert accuracy(model, xt, yt) >= 0.9
    assert check_outputs(model, xt) == []  # negative distances are fine scores
    for attack in (FGSM(model, eps=0.3), PGD(model, eps=0.3, steps=10, alpha=0.05, loss="margin"),
                   DeepFool(model)):
        assert accuracy(model, attack(xt, yt), yt) <= 0.25, type(attack).__name__
    assert accuracy(model, Square(model, n_queries=300)(xt, yt), yt) <= 0.5
    res = JSMA(model, space="logits", gamma=0.3).run(xt, yt)
    with torch.no_grad():
        assert (model(res.adv).argmax(1) == res.target).float().mean() >= 0.5


def test_number_of_classes_comes_from_the_model():
    x, y = make_data(300, seed=3, k=3)
    model = NearestCentroid(x, y, 3)
    xt, yt = make_data(12, seed=4, k=3)
    res = JSMA(model, space="logits").run(xt, yt)
    assert res.target.max() < 3 and (res.target != yt).all()
    assert accuracy(model, DeepFool(model)(xt, yt), yt) <= 0.25


# ------------------------------------------------------------------------ checks

def test_checks_quiet_on_a_healthy_model(subject):
    net, x, y = subject
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_checks(net, x, y) == []
        assert check_black_box_vs_white_box(0.9, 0.5) == []


def test_check_warns_on_zero_gradients(subject):
    net, x, y = subject

    class Quantised(nn.Module):  # rounding the input masks every gradient
        def forward(self, x):
            return net(torch.round(x * 4) / 4)

    with pytest.warns(AttackCheckWarning, match="zero input gradient for all 32 samples"):
        msgs = check_gradients(Quantised(), x, y)
    assert len(msgs) == 1 and "masked" in msgs[0]


def test_check_warns_on_saturated_softmax(subject):
    net, x, y = subject
    hot = nn.Sequential(net, nn.Softmax(1))
    with pytest.warns(AttackCheckWarning, match="look like probabilities"):
        msgs = check_outputs(hot, x)
    assert len(msgs) == 1

    class Scaled(nn.Module):  # CE gradients underflow; the margin still has some
        def forward(self, x):
            return net(x) * 1e4

    with pytest.warns(AttackCheckWarning, match="use loss='margin'"):
        check_gradients(Scaled(), x, y)


def test_check_warns_on_random_outputs(subject):
    net, x, _ = subject

    class Noisy(nn.Module):
        def forward(self, x):
            return net(x) + torch.randn(len(x), K)

    with pytest.warns(AttackCheckWarning, match="differ between two identical forward passes"):
        check_outputs(Noisy(), x)


def test_check_black_box_beating_white_box():
    with pytest.warns(AttackCheckWarning, match="gradient masking"):
        assert len(check_black_box_vs_white_box(0.2, 0.6)) == 1
    wb = torch.tensor([True, False, False, True])
    bb = torch.tensor([True, True, True, False])
    with pytest.warns(AttackCheckWarning, match="2 samples fooled only by the black-box"):
        check_black_box_vs_white_box(wb, bb, tol=0.1)
    assert check_black_box_vs_white_box(wb, wb) == []
