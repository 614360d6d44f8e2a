"""Certified training against learned class prototypes (``--cert-head prototypes``): the run
carries its prototypes, index building herds real training images toward them, and the
flag is refused where it means nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dundi.errors import DundiError
from dundi.training.config import TrainConfig


@pytest.fixture(scope="module")
def prototype_run(tmp_path_factory, data_dir):
    from dundi.run.pipeline import train_dundi_run

    out = tmp_path_factory.mktemp("runs") / "prototypes"
    cfg = TrainConfig("mnist-10k", "cnn-ibp", epochs=3, limit=1000, metric="sqeuclidean", certified=True,
                      cert_head="prototypes", cert_eps=0.1, cert_warmup=2.0, cert_ramp=1.0, cert_per_class=10)
    train_dundi_run(cfg, out, None, data_dir, progress=False, log=lambda s: None)
    return out


@pytest.mark.realdata
def test_a_prototype_run_reloads_with_its_trained_prototypes(prototype_run):
    from safetensors.torch import load_file

    from dundi.run.storage import load_model

    model, meta = load_model(prototype_run)
    assert meta["prototypes"] == 10
    saved = load_file(str(prototype_run / "model.safetensors"))["prototypes"]
    assert torch.equal(model.prototypes.detach(), saved)
    assert not torch.allclose(saved, torch.zeros_like(saved))
    weights, biases = model.prototype_head()
    assert weights.shape == (10, model.embed_dim) and (biases <= -(saved * saved).sum(1)).all()


@pytest.mark.realdata
def test_index_build_herds_oracles_toward_the_prototypes(prototype_run, data_dir, tmp_path):
    import shutil

    from dundi.data import load_split
    from dundi.nets.inference import forward_batched
    from dundi.rule.index import OracleIndex
    from dundi.run.storage import load_model
    from dundi.run.pipeline import build_index

    run_dir = tmp_path / "run"
    shutil.copytree(prototype_run, run_dir)
    index = build_index(run_dir, n=10, seed=0, data_dir=data_dir, oracle_kind="images")
    assert index.meta["select"] == "prototypes"
    assert build_index(run_dir, n=10, seed=0, data_dir=data_dir, oracle_kind="images").meta["ids"] == index.meta["ids"]
    images, labels, ids = load_split("mnist-10k", "train", data_dir, limit=1000)
    row_of = {int(i): r for r, i in enumerate(ids)}
    picked = np.array([row_of[int(i)] for i in index.meta["ids"]]).reshape(10, 10)
    assert len(np.unique(picked)) == picked.size and (labels[picked] == np.arange(10)[:, None]).all()
    model, _ = load_model(run_dir)
    target = model.prototypes.detach().double().numpy()

    def gap(rows: np.ndarray) -> float:  # distance of each class's oracle mean to its prototype
        emb = forward_batched(model, images[rows.ravel()]).reshape(10, 10, -1).astype(np.float64)
        return float(np.linalg.norm(emb.mean(1) - target, axis=1).sum())

    random_gaps = [gap(OracleIndex.select(labels, 10, s, 10)) for s in range(5)]
    assert gap(picked) < min(random_gaps)


def test_the_prototype_head_needs_certified_training():
    with pytest.raises(DundiError, match="--certified"):
        TrainConfig("mnist-10k", "cnn-ibp", cert_head="prototypes").validate()
    with pytest.raises(DundiError, match="unknown"):
        TrainConfig("mnist-10k", "cnn-ibp", metric="sqeuclidean", certified=True, cert_head="free").validate()


@pytest.mark.realdata
def test_prototypes_as_oracles_rank_as_the_trained_head_and_their_certificates_hold(prototype_run, data_dir,
                                                                                    tmp_path):
    """Two vectors per class whose mean and mean squared norm are the learned head's: the
    served rule answers the head's argmax, and certified answers keep their label
    at corners, random points and rival-ward gradient steps of their balls, served in mixed
    batches (tests/test_served_certificate.py's attacks)."""
    import shutil

    from dundi.data import load_split
    from dundi.nets.inference import forward_batched
    from dundi.rule.params import TwoStepRule
    from dundi.run.directory import Run
    from dundi.run.pipeline import build_index
    from test_served_certificate import assert_no_point_flips  # tests/ is on sys.path

    run_dir = tmp_path / "run"
    shutil.copytree(prototype_run, run_dir)
    index = build_index(run_dir, seed=0, data_dir=data_dir)  # a prototype run's default
    assert index.n == 2 and index.meta["select"] == "prototypes-as-oracles"
    run = Run.load(run_dir)
    x, _, _ = load_split("mnist-10k", "test", data_dir, limit=300)
    weights, biases = (t.detach().double().numpy() for t in run.model.prototype_head())
    head = forward_batched(run.model, x).astype(np.float64) @ weights.T + biases
    ordered = np.sort(head, 1)
    clear = ordered[:, -1] - ordered[:, -2] > 1e-6 * np.abs(ordered[:, -1]).max()
    labels = run.classify(x, TwoStepRule(None, 2, 5)).labels
    assert clear.mean() > 0.95 and (labels[clear] == head.argmax(1)[clear]).all()

    radius = run.certifier(TwoStepRule(None, 2, 5)).radius(
        torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))).numpy().astype(np.float64)
    radius[np.flatnonzero(radius > 0)[24:]] = 0.0  # 24 certified images are attacked
    assert assert_no_point_flips(run, x, labels, radius, None, 2, 5) >= 8


def test_prototypes_as_oracles_need_a_prototype_run(certified_run, tmp_path):
    """Asked of a run trained against batch means, the prototype index is refused by name."""
    import shutil

    from dundi.run.pipeline import build_index

    run_dir = tmp_path / "run"
    shutil.copytree(certified_run, run_dir)
    with pytest.raises(DundiError, match="--cert-head prototypes"):
        build_index(run_dir, oracle_kind="prototypes")
    with pytest.raises(DundiError, match="--select-eps chooses training images"):
        build_index(run_dir, oracle_kind="prototypes", margin_eps=0.1)
