"""DunDi-AT and Madry-style training steps: the inner PGD respects its budget and raises the loss."""

import dataclasses

import numpy as np
import pytest
import torch

from dundi.nets.models import build_distance_net, build_native
from dundi.training.adversarial import (
    adversarial_anchors,
    adversarial_anchors_to_classes,
    adversarial_inputs_ce,
    class_prototypes,
    pgd_maximise,
    prototype_margin,
)
from dundi.training.config import TrainConfig
from dundi.training.losses import triplet_loss, tuple_distances
from dundi.training.passes import epoch_config, triplet_batch_loss
from dundi.training.tuples import sample_tuples

SHAPE = (1, 28, 28)


def _loss_of(ea, ep, en):
    return triplet_loss(*tuple_distances(ea, ep, en), "sigmoid")


def test_pgd_maximise_stays_in_budget_and_raises_the_loss():
    torch.manual_seed(0)
    target = torch.rand(8, 1, 28, 28)
    x = torch.rand(8, 1, 28, 28)
    loss = lambda z: ((z - target) ** 2).sum()  # noqa: E731
    x_adv = pgd_maximise(loss, x, eps=0.1, alpha=0.02, steps=10)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert loss(x_adv) > loss(x)


def test_adversarial_anchors_raise_the_triplet_loss_and_restore_mode():
    torch.manual_seed(0)
    model = build_distance_net("lenet1", SHAPE).train()
    xa, xp, xn = torch.rand(3, 16, *SHAPE).unbind(0)
    with torch.no_grad():
        ep, en = model(xp), model(xn)
    adv = adversarial_anchors(model, xa, ep, en, _loss_of, eps=0.3, alpha=0.05, steps=10)
    assert model.training, "the caller's train mode is restored"
    assert (adv - xa).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    model.eval()
    with torch.no_grad():
        assert _loss_of(model(adv), ep, en).mean() > _loss_of(model(xa), ep, en).mean()


def test_madry_examples_raise_cross_entropy():
    torch.manual_seed(0)
    model = build_native("lenet1", SHAPE, 10)
    x, y = torch.rand(16, *SHAPE), torch.randint(0, 10, (16,))
    adv = adversarial_inputs_ce(model, x, y, eps=0.3, alpha=0.05, steps=10)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(model(adv), y) > ce(model(x), y)
    assert (adv - x).abs().max() <= 0.3 + 1e-6


def test_prototype_margin_matches_a_loop_and_skips_absent_classes():
    torch.manual_seed(0)
    emb, labels = torch.randn(40, 5), torch.arange(40) % 4  # classes 0..3 present, 4 absent
    protos = class_prototypes(emb, labels, 5)
    assert torch.isnan(protos[4]).all()
    torch.testing.assert_close(protos[2], emb[labels == 2].mean(0))
    queries, qlabels = torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    got = prototype_margin(queries, qlabels, protos)
    for i in range(7):
        d = [torch.linalg.vector_norm(queries[i] - protos[c]).item() for c in range(4)]
        own = d[qlabels[i]]
        assert got[i].item() == pytest.approx(own - min(v for c, v in enumerate(d) if c != qlabels[i]), abs=1e-5)


def test_class_anchors_move_towards_another_class_within_budget():
    torch.manual_seed(0)
    model = build_distance_net("lenet1", SHAPE).train()
    x, y = torch.rand(20, *SHAPE), torch.arange(20) % 5
    with torch.no_grad():
        protos = class_prototypes(model(x), y, 5)
    adv = adversarial_anchors_to_classes(model, x, y, protos, eps=0.3, alpha=0.05, steps=10)
    assert model.training and (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    model.eval()
    with torch.no_grad():
        assert (prototype_margin(model(adv), y, protos) > prototype_margin(model(x), y, protos)).float().mean() > 0.9


def test_adversarial_budget_warms_up_linearly():
    cfg = TrainConfig(adversarial=True, adv_eps=0.3, adv_warmup=3, epochs=5)
    assert [round(epoch_config(cfg, e).adv_eps, 6) for e in range(5)] == [0.1, 0.2, 0.3, 0.3, 0.3]
    assert epoch_config(TrainConfig(adversarial=True), 0).adv_eps == 0.3


@pytest.mark.parametrize("target,adv_loss", [("classes", "prototype"), ("classes", "triplet"),
                                             ("tuple", "prototype")])
def test_adversarial_triplet_step_mixes_losses_and_trains(target, adv_loss):
    torch.manual_seed(0)
    labels = np.repeat(np.arange(10), 6)
    images = torch.rand(len(labels), *SHAPE)
    batch = sample_tuples(labels, 32, seed=0)
    model = build_distance_net("lenet1", SHAPE)
    adv_cfg = TrainConfig(adversarial=True, adv_eps=0.3, adv_steps=5, adv_mix=1.0, adv_target=target,
                          adv_loss=adv_loss)
    # the same loss with a budget too small to matter: the anchors are (nearly) clean
    clean, _ = triplet_batch_loss(model, images, torch.from_numpy(labels), batch,
                                  dataclasses.replace(adv_cfg, adv_eps=1e-6))
    adv, _ = triplet_batch_loss(model, images, torch.from_numpy(labels), batch, adv_cfg)
    assert adv > clean  # the adversarial anchors are worse for the current model
    adv.backward()
    assert all(p.grad is not None for p in model.embedding.parameters())
