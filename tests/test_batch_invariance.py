"""An answer and its certificate never depend on the batch, at the thread counts we serve with.

Serve replicas and `dundi serve` compute with one torch thread (DeployConfig.torch_threads);
the machine's default is two. At one thread oneDNN's convolution kernels (and so the Linear
layers run as 1×1 convolutions) took another path for batches under 16 rows, and float64
matrix products give a row other bits when the batch is not a multiple of 4: an image got
other embedding bits, scores -- at a near-tie another label -- and another certified radius
alone than in a batch of 16. Each test here runs at 1 and at 2 threads and compares every
image's bits alone with its bits at every batch size 1..256 at a random position among
random companions, and across the two thread counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dundi.nets.models import build_distance_net
from dundi.robustness.certificate import AbstainGate
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.run.directory import Run

RULE = TwoStepRule(10, 3, 3)
FIELDS = ("labels", "topk_classes", "coarse_scores", "fine_scores", "nearest_distance")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def subject() -> tuple[Run, np.ndarray]:
    """A cnn-ibp Distance NN (the certified architecture, seeded weights) whose oracles sit at
    near-ties: every class's 10 oracles within 1e-3 of one common point, so the last bits of
    a score decide labels. Images are uniform noise plus a few bright strokes in [0, 1]."""
    torch.manual_seed(0)
    net = build_distance_net("cnn-ibp", (1, 28, 28)).eval()
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (300, 1, 28, 28)).astype(np.float32) ** 3
    with torch.no_grad():
        centre = net(torch.from_numpy(images[:50])).mean(0).numpy().astype(np.float64)
    spread = 1e-3 * np.linalg.norm(centre) / np.sqrt(len(centre))
    oracles = centre + spread * rng.standard_normal((10 * 10, len(centre)))
    index = OracleIndex(np.ascontiguousarray(oracles, dtype=np.float32), 10, metric="sqeuclidean")
    meta = {"kind": "dundi", "in_shape": [1, 28, 28], "num_classes": 10}
    return Run(Path("in-memory"), net, meta, index), images


@pytest.fixture(scope="module")
def separated(subject) -> tuple[Run, np.ndarray]:
    """The same network with oracles that certify: class c's 10 oracles are the embeddings of
    10 copies of anchor image c with pixel noise 0.01; the probes are the anchors with other
    pixel noise 0.02, so each sits well inside its class and gets a radius above 0."""
    run, images = subject
    rng = np.random.default_rng(1)
    anchors = images[200:210]
    near = lambda scale, copies: np.clip(np.repeat(anchors, copies, 0) + scale * rng.standard_normal(
        (len(anchors) * copies, *anchors.shape[1:])), 0, 1).astype(np.float32)
    with torch.no_grad():
        oracles = run.model(torch.from_numpy(near(0.01, 10))).numpy()
    index = OracleIndex(np.ascontiguousarray(oracles), 10, metric="sqeuclidean")
    return Run(run.path, run.model, run.meta, index), near(0.02, 2)


def _sizes() -> list[int]:
    return list(range(1, 257))


def test_an_answer_is_the_same_bits_in_any_batch_at_any_thread_count(subject, threads):
    run, images = subject
    probes, others = images[:24], images[24:]
    alone = [run.classify(probes[i:i + 1], RULE) for i in range(len(probes))]
    assert len({int(a.labels[0]) for a in alone}) > 1, "near-ties should not all go one way"
    rng = np.random.default_rng(threads)
    for size in _sizes():
        i = int(rng.integers(len(probes)))
        batch = others[rng.choice(len(others), size, replace=False)].copy()
        pos = int(rng.integers(size))
        batch[pos] = probes[i]
        got = run.classify(batch, RULE)
        for field in FIELDS:
            a, b = getattr(alone[i], field)[0], getattr(got, field)[pos]
            assert np.array_equal(a, b), (f"{threads} thread(s): image {i}'s {field} differs in a "
                                          f"batch of {size} at position {pos} from its answer alone")


def test_answers_are_the_same_bits_at_one_and_two_threads(subject):
    run, images = subject
    before = torch.get_num_threads()
    try:
        answers = {}
        for t in (1, 2):
            torch.set_num_threads(t)
            answers[t] = [run.classify(images[:size], RULE) for size in (1, 2, 7, 15, 16, 17, 64)]
    finally:
        torch.set_num_threads(before)
    for one, two in zip(answers[1], answers[2]):
        for field in FIELDS:
            assert np.array_equal(getattr(one, field), getattr(two, field)), \
                f"{field} of a batch of {len(one.labels)} differs between 1 and 2 threads"


def test_a_certified_radius_is_the_same_bits_in_any_batch(subject, separated, threads):
    """The radius search (the served default; on [0, 2e-4], where this untrained network's
    radii lie) and one certify_eps pass, with an active mean-pixel abstain gate: every image's
    margins, and so its radius, are the same bits in batches of 1..256 at any position."""
    (run, probes), others = separated, subject[1]
    images = np.concatenate([probes, others])
    certifier = run.certifier(RULE)
    labels = run.classify(images, RULE).labels
    gate = AbstainGate(abstain_max_mean=float(probes.mean((1, 2, 3)).max()) + 5e-5)
    y = torch.from_numpy(labels)
    x = torch.from_numpy(images)
    radius = lambda rows: certifier.radius(x[rows], y[rows], eps_max=2e-4, gate=gate)
    alone = torch.cat([radius([i]) for i in range(len(probes))])
    assert (alone > 0).sum() >= 8, "too few images certified: the radius comparison checks little"
    at_eps = torch.cat([certifier._slack(x[i:i + 1], y[i:i + 1], 2e-5, gate) for i in range(len(probes))])
    rng = np.random.default_rng(10 + threads)
    for size in [1, 3, 7, 15, 16, 17, 64, 256]:
        pick = rng.choice(len(others), size, replace=False) + len(probes)
        pos = int(rng.integers(size))
        i = int(rng.integers(len(probes)))
        pick[pos] = i
        r = radius(pick)
        assert torch.equal(r[pos], alone[i]), (f"{threads} thread(s): image {i}'s radius is "
                                               f"{float(r[pos])!r} in a batch of {size}, {float(alone[i])!r} alone")
        m = certifier._slack(x[pick], y[pick], 2e-5, gate)
        assert torch.equal(m[pos], at_eps[i]), f"image {i}'s margins at eps 2e-5 differ in a batch of {size}"
