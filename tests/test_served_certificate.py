"""Certificates checked against the answer the product serves, not against a float64 model.

Each test builds a real run directory (a cnn-ibp Distance NN, a squared-Euclidean oracle
index, saved and loaded through run.json's hashes) and attacks the served path itself:
``Run.classify`` and ``LoadedModel.predict`` -- the float32 network, the rule, the abstain
gate -- on the very points an auditor would try: corners of each certified ball, random
points, and points found by gradient steps towards the nearest rival, classified in batches
of many sizes with other images around them. The setups are the ones that broke the earlier
float32 rule: queries 3-10x longer than the oracles, classes at near-ties, a shortlisted
index, and an abstain threshold within reach of the ball.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dundi.robustness.certificate import RADIUS_STEPS
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.rule.reference import two_step_reference
from dundi.run.directory import Run
from dundi.run.storage import save_oracle

pytestmark = pytest.mark.realdata
N, M = 10, 3   # the certified_run fixture indexes 10 oracles per class


@pytest.fixture(scope="module")
def digits(data_dir) -> tuple[np.ndarray, np.ndarray]:
    from dundi.data import load_split

    x, y, _ = load_split("mnist-10k", "test", data_dir, limit=600)
    return x, y


def derived_run(certified_run: Path, path: Path, vectors: np.ndarray, classes: int) -> Run:
    """The certified run's trained network with another oracle database (C·n rows,
    class-major), saved and loaded as a real run directory."""
    shutil.copytree(certified_run, path)
    save_oracle(path, OracleIndex(np.ascontiguousarray(vectors, dtype=np.float32), classes,
                                  metric="sqeuclidean"))
    return Run.load(path)


def scaled_run(certified_run: Path, path: Path, scale: float, tie: float | None = None) -> Run:
    """Its own oracles times ``scale`` (queries become 1/scale times longer than the oracles);
    with ``tie``, every class's oracles are instead their common mean plus noise of relative
    size ``tie``, so every query sits at a near-tie."""
    base = Run.load(certified_run).oracle
    emb = base.vectors.astype(np.float64)
    if tie is not None:
        rng = np.random.default_rng(0)
        mean = emb.mean(0)
        emb = mean + tie * np.linalg.norm(mean) * rng.standard_normal(emb.shape) / np.sqrt(emb.shape[1])
    return derived_run(certified_run, path, scale * emb, base.num_classes)


def ball_points(x: np.ndarray, radius: float, count: int, seed: int) -> np.ndarray:
    """Points of the L∞ ball (clipped to [0, 1]) around one float32 image, as float32 values
    that lie inside the real ball: both full corners, random corners and random points."""
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], (count, *x.shape))
    signs[0], signs[1] = 1.0, -1.0
    uniform = rng.uniform(-1, 1, (count // 2, *x.shape))
    steps = np.concatenate([signs, uniform]) * radius
    return to_ball(x, x.astype(np.float64) + steps, radius)


def to_ball(x: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """float32 points clipped to [0, 1], each pixel moved back one float32 step towards the
    image where rounding took it out of the real ball."""
    lo, hi = np.clip(x - np.float64(radius), 0, 1), np.clip(x + np.float64(radius), 0, 1)
    p = np.clip(points, lo, hi).astype(np.float32)
    p = np.where(p.astype(np.float64) > hi, np.nextafter(p, np.float32(0)), p)
    return np.where(p.astype(np.float64) < lo, np.nextafter(p, np.float32(1)), p)


def rival_steps(run: Run, x: np.ndarray, labels: np.ndarray, radius: np.ndarray, n: int, m: int,
                steps: int = 8) -> np.ndarray:
    """Signed-gradient steps inside each ball that lower the margin of the answered class
    against its nearest rival in the fine step (a white-box attack on the rule's linear form)."""
    oracles = torch.from_numpy(run.oracle.blocks[:, :n].astype(np.float64))
    y = torch.from_numpy(labels)
    r = torch.from_numpy(radius)[:, None, None, None]
    x0 = torch.from_numpy(x.astype(np.float64))
    adv = x0.clone()
    net = run.model.double()
    for _ in range(steps):
        adv.requires_grad_(True)
        z = net(adv)
        fine = ((z[:, None, None, :] - oracles[None]) ** 2).sum((-1, -2))     # (B, C)
        own = fine.gather(1, y[:, None])
        rival = fine.masked_fill(torch.nn.functional.one_hot(y, fine.shape[1]).bool(), float("inf")).min(1, keepdim=True)[0]
        (own - rival).sum().backward()
        with torch.no_grad():
            adv = torch.minimum(torch.maximum(adv + r / 2 * adv.grad.sign(), x0 - r), x0 + r).clamp(0, 1)
    run.model.float()
    return adv.detach().numpy()


def served_labels_in_mixed_batches(run: Run, points: np.ndarray, n: int, m: int, k: int, seed: int
                                   ) -> np.ndarray:
    """The served labels of ``points``, classified shuffled in batches of varying size."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(points))
    labels = np.empty(len(points), np.int64)
    start = 0
    while start < len(points):
        size = int(rng.choice([1, 2, 7, 16, 33, 64, 256]))
        idx = order[start:start + size]
        labels[idx] = run.classify(points[idx], TwoStepRule(n, m, k)).labels
        start += size
    return labels


def assert_no_point_flips(run: Run, x: np.ndarray, labels: np.ndarray, radius: np.ndarray,
                          n: int, m: int, k: int) -> int:
    """Every certified image keeps its label at every tried point of its ball; returns how
    many certified images were attacked."""
    certified = np.flatnonzero(radius > 0)
    assert len(certified) >= 8, f"only {len(certified)} certified images: the setup checks nothing"
    pts, owner = [], []
    for i in certified:
        p = ball_points(x[i], float(radius[i]), 24, int(i))
        pts.append(p)
        owner += [i] * len(p)
    adv = rival_steps(run, x[certified], labels[certified], radius[certified], n, m)
    pts.append(np.stack([to_ball(x[i], a, float(radius[i])) for i, a in zip(certified, adv)]))
    owner += certified.tolist()
    got = served_labels_in_mixed_batches(run, np.concatenate(pts), n, m, k, seed=1)
    owner = np.array(owner)
    flipped = np.flatnonzero(got != labels[owner])
    assert not len(flipped), (f"{len(set(owner[flipped]))} certified images answered otherwise "
                              f"inside their balls (e.g. image {owner[flipped[0]]}, radius "
                              f"{radius[owner[flipped[0]]]:.3g}: {got[flipped[0]]} != {labels[owner[flipped[0]]]})")
    return len(certified)


@pytest.mark.parametrize("scale", [0.1, 0.3])
def test_certificates_hold_for_queries_much_longer_than_the_oracles(certified_run, digits, tmp_path, scale):
    """Oracles at 0.1 and 0.3 of the queries' scale: float32 distances lose most digits of
    the margin here; every certified answer must still hold at every tried point."""
    run = scaled_run(certified_run, tmp_path / "run", scale)
    x = digits[0][:96]
    labels = run.classify(x, TwoStepRule(m=M, k=3)).labels
    radius = run.certifier(TwoStepRule(N, M, 3)).radius(torch.from_numpy(x), torch.from_numpy(labels), eps_max=0.25).numpy()
    assert_no_point_flips(run, x, labels, radius, N, M, 3)


def test_an_answer_never_depends_on_its_batch(certified_run, digits, tmp_path):
    """At near-ties (every class's oracles within 1e-4 of one point), each image's whole
    answer is the same bits alone and in batches of 2..256 at any position with any others."""
    run = scaled_run(certified_run, tmp_path / "run", 0.2, tie=1e-4)
    x, others = digits[0][:40], digits[0][40:]
    alone = [run.classify(x[i:i + 1], TwoStepRule(m=M, k=3)) for i in range(len(x))]
    assert len({int(a.labels[0]) for a in alone}) > 1, "near-ties should not all go one way"
    rng = np.random.default_rng(0)
    for size in [2, 3, 8, 15, 16, 17, 64, 100, 255, 256]:
        for i in rng.choice(len(x), 4, replace=False):
            batch = others[rng.choice(len(others), size, replace=False)].copy()
            pos = int(rng.integers(size))
            batch[pos] = x[i]
            got = run.classify(batch, TwoStepRule(m=M, k=3))
            for field in ("labels", "topk_classes", "coarse_scores", "fine_scores", "nearest_distance"):
                a, b = getattr(alone[i], field)[0], getattr(got, field)[pos]
                assert np.array_equal(a, b), f"image {i}: {field} differs in a batch of {size} at {pos}"


def test_near_tie_certificates_hold_in_any_batch(certified_run, digits, tmp_path):
    run = scaled_run(certified_run, tmp_path / "run", 0.2, tie=1e-3)
    x = digits[0][:128]
    labels = run.classify(x, TwoStepRule(m=M, k=3)).labels
    radius = run.certifier(TwoStepRule(N, M, 3)).radius(torch.from_numpy(x), torch.from_numpy(labels), eps_max=2e-3).numpy()
    assert_no_point_flips(run, x, labels, radius, N, M, 3)


def test_a_shortlisted_index_is_certified_for_the_step_one_that_answers(certified_run, digits, tmp_path):
    """70 classes, one tight (ten 0s) and 69 spread (ten random digits each), with the
    exact-step-1 limit lowered so that FAISS would shortlist: a certifiable index answers
    with the exact step 1 anyway, says so, and its answers are Algorithm 1's (the float64
    reference) and hold at every tried point of their certified balls."""
    x, y = digits
    base = Run.load(certified_run)
    rng = np.random.default_rng(1)
    zeros = np.flatnonzero(y == 0)
    rows = np.concatenate([zeros[:10], rng.choice(np.arange(100, len(x)), 690)])
    run = derived_run(certified_run, tmp_path / "run", base.embed(x[rows]), 70)
    run.oracle.exact_coarse_limit = run.oracle.full_limit = 8
    queries = x[zeros[10:40]]
    got = run.classify(queries, TwoStepRule(m=M, k=5))
    ref = two_step_reference(torch.from_numpy(run.embed(queries)), torch.from_numpy(run.oracle.blocks),
                             run.oracle.resolve(TwoStepRule(N, M, 5)))
    assert np.array_equal(got.labels, ref.numpy())
    radius = run.certifier(TwoStepRule(N, M, 5)).radius(torch.from_numpy(queries), torch.from_numpy(got.labels),
                                           eps_max=0.25).numpy()
    assert_no_point_flips(run, queries, got.labels, radius, N, M, 5)
    assert run.oracle.step1_kind(run.oracle.resolve(TwoStepRule(N, M))) == "exact (float64)"


def test_the_served_radius_covers_the_abstain_gate(certified_run, digits):
    """With a mean-pixel and a nearest-oracle threshold just above the images' own values, the
    served radius stops where a point of the ball would be answered "unknown": at every tried
    point -- the brightest corner first -- the service answers the same label, not abstaining."""
    from dundi.serving.model import LoadedModel, ModelConfig

    x = digits[0][:48]
    base = LoadedModel(ModelConfig(str(certified_run), m=M, k=3))
    pred = base.predict(x)
    mean = x.reshape(len(x), -1).mean(1)
    config = ModelConfig(str(certified_run), m=M, k=3, abstain_max_mean=float(np.median(mean) + 0.03),
                         abstain_threshold=float(np.quantile(pred.nearest_distance, 0.9) * 1.05))
    model = LoadedModel(config, run=base.run)
    served = model.predict(x)
    answered = ~served.abstained
    radius, labels = served.certified_radius, served.labels
    assert answered.sum() >= 8
    label_radius = model.certifier.radius(torch.from_numpy(x), torch.from_numpy(labels)).numpy()
    certified = np.flatnonzero(answered & (radius > 0))
    assert len(certified) >= 4
    for i in certified:
        pts = ball_points(x[i], float(radius[i]), 16, int(i))
        answer = model.predict(pts)
        assert not answer.abstained.any(), f"image {i}: abstains inside its certified radius {radius[i]:.3g}"
        assert (answer.labels == labels[i]).all()
    # each search stops within its resolution below its own threshold, and the gated one's is lower
    assert (radius[answered] <= label_radius[answered] + 2.0 ** -RADIUS_STEPS).all()
    assert (radius[answered] < label_radius[answered]).any(), "the gate never bound: the test checks nothing"
