"""GPU paths: training (DunDi-AT, Madry-AT, certified) and attacks on CUDA, FAISS on the GPU,
Ray Train on GPU workers. Every test here is marked ``gpu`` and is skipped, with its reason
shown, where no CUDA device (or no FAISS GPU build, or fewer GPUs) is present:
``pytest -m gpu -rs`` runs them; ``bench/gpu_check.sh`` runs them with the GPU benchmarks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dundi.data import load_split
from dundi.nets.models import build_distance_net, build_native
from dundi.rule.params import TwoStepRule
from dundi.training.config import TrainConfig
from dundi.training.loop import fit
from dundi.training.passes import adversarial_generator, triplet_batch_loss

pytestmark = [pytest.mark.gpu, pytest.mark.realdata]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """CPU and GPU results are compared: no TF32 on the GPU side."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def digits(data_dir):
    x, y, _ = load_split("mnist-10k", "train", data_dir, limit=600)
    return x, y


def at_config(**kw) -> TrainConfig:
    base = dict(arch="lenet5", epochs=1, tuples=256, batch_size=64, adversarial=True, adv_eps=0.3, adv_steps=3)
    return TrainConfig(**{**base, **kw})


def test_dundi_at_batch_on_cuda_equals_cpu(digits):
    """Same weights, tuples and PGD starts (drawn on the CPU generator, then moved): the DunDi-AT
    loss and its gradient agree across devices, so the GPU trains the same objective."""
    x, y = digits
    cfg = at_config()
    torch.manual_seed(0)
    cpu_net = build_distance_net("lenet5", (1, 28, 28), 128)
    gpu_net = build_distance_net("lenet5", (1, 28, 28), 128).to(CUDA)
    gpu_net.load_state_dict(cpu_net.state_dict())
    batch = np.stack([np.arange(0, 64), np.arange(64, 128), np.arange(128, 192)], 1)
    batch[:, 1] = [np.flatnonzero(y == y[a])[1] for a in batch[:, 0]]  # a positive of each anchor
    batch[:, 2] = [np.flatnonzero(y != y[a])[0] for a in batch[:, 0]]  # a negative
    losses, grads = [], []
    for net, dev in ((cpu_net, "cpu"), (gpu_net, CUDA)):
        images, labels = torch.as_tensor(x).to(dev), torch.as_tensor(y).to(dev)
        loss, _ = triplet_batch_loss(net, images, labels, batch, cfg, adversarial_generator(cfg, 0))
        net.zero_grad()
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().cpu() for p in net.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)
    # PGD steps by the gradient's sign: where an entry is near zero its sign can differ between
    # devices and move that pixel by 2*alpha, so the two gradients agree closely, not exactly
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert cos > 0.99


def test_pgd_examples_on_cuda_equal_cpu_ones(digits):
    """The PGD random start is drawn on the CPU generator on every device: a CUDA run crafts the
    same examples as a CPU run (different starts would leave almost no pixel equal)."""
    from dundi.training.adversarial import pgd_maximise

    x = torch.as_tensor(digits[0][:64])
    torch.manual_seed(0)
    net = build_distance_net("lenet5", (1, 28, 28), 128)
    target = torch.randn(64, 128)
    out = []
    for dev in ("cpu", CUDA):
        net.to(dev)
        loss = lambda xa: (net(xa) - target.to(dev)).square().sum()  # noqa: E731
        out.append(pgd_maximise(loss, x.to(dev), 0.3, 0.1, 3, torch.Generator().manual_seed(5)).cpu())
    same = torch.isclose(out[0], out[1], atol=1e-5).float().mean().item()
    assert same > 0.98, f"only {same:.1%} of pixels agree"


@pytest.mark.parametrize("kind,cfg", [
    ("dundi", at_config()),
    ("native", at_config(arch="lenet1", batch_size=32)),
    ("dundi", TrainConfig(arch="cnn-ibp", epochs=2, metric="sqeuclidean", certified=True, cert_eps=0.1,
                          cert_warmup=0.0, cert_ramp=1.0, cert_per_class=5)),
], ids=["dundi-at", "madry-at", "certified"])
def test_training_runs_on_cuda(digits, tmp_path, kind, cfg):
    """Each training path runs an epoch with its tensors, model and PGD on the GPU, checkpoints,
    and resumes on the GPU."""
    x, y = digits
    net = (build_native(cfg.arch, (1, 28, 28), 10) if kind == "native"
           else build_distance_net(cfg.arch, (1, 28, 28), 128))
    history = fit(net, x, y, cfg, kind, progress=False, checkpoints=tmp_path / "ckpt", device="cuda")
    assert next(net.parameters()).device.type == "cuda"
    assert len(history) == cfg.epochs and all(np.isfinite(h["loss"]) for h in history)
    more = dataclasses.replace(cfg, epochs=cfg.epochs)  # same settings: resumes, nothing left to do
    again = fit(net, x, y, more, kind, progress=False, checkpoints=tmp_path / "ckpt", device="cuda")
    assert again == history


def test_exact_rule_attack_on_cuda_is_judged_by_the_faiss_rule(mnist_runs, data_dir):
    """APGD on the exact two-step stand-in, run on the GPU: every image stays in the eps ball, and
    the stand-in's argmax on the GPU equals the deployed FAISS rule's answer on the CPU."""
    from dundi.attacks.apgd import APGD
    from dundi.rule.reference import TwoStepScorer
    from dundi.run.directory import Run

    run = Run.load(mnist_runs["dundi"])
    x, y, _ = load_split("mnist-10k", "test", data_dir, limit=128)
    scorer = TwoStepScorer(run.model.to(CUDA), run.oracle_tensor().to(CUDA), run.oracle.resolve(TwoStepRule(m=3, k=5))).eval()
    adv = APGD(scorer, eps=0.1, steps=20, loss="dlr").run(torch.as_tensor(x), torch.as_tensor(y)).adv
    assert adv.device.type == "cuda"
    assert (adv.cpu() - torch.as_tensor(x)).abs().max().item() <= 0.1 + 1e-6
    with torch.no_grad():
        on_gpu = scorer(adv).argmax(1).cpu().numpy()
    rule = run.classify(adv.cpu().numpy(), TwoStepRule(run.oracle.n, 3, 5)).labels
    assert (on_gpu == rule).mean() >= 0.99  # float32 ties between devices aside


def test_faiss_gpu_two_step_equals_cpu():
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        pytest.skip("this FAISS build has no GPU support (pip uninstall faiss-cpu; pip install 'dundi[gpu]')")
    from dundi.rule.index import OracleIndex

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50 * 20, 64)).astype(np.float32)
    queries = rng.normal(size=(300, 64)).astype(np.float32)
    index = OracleIndex(vectors, 50, full_limit=0)  # the IVF/coarse path, on the GPU when present
    reference = OracleIndex(vectors, 50)
    np.testing.assert_array_equal(index.classify(queries, TwoStepRule(20, 3, 5)).labels,
                                  reference.classify(queries, TwoStepRule(20, 3, 5)).labels)


def test_ray_train_on_gpu_workers(tmp_path, data_dir):
    """Ray Train with NCCL: one GPU worker, or two where two GPUs exist."""
    pytest.importorskip("ray", reason="Ray is not installed here")
    workers = 2 if torch.cuda.device_count() >= 2 else 1
    import ray

    from dundi.distributed.train_job import RayOptions, run_ray_training

    ray.init(address="local", num_cpus=4, num_gpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        cfg = TrainConfig(dataset="mnist-10k", arch="lenet5", epochs=1, tuples=2000, limit=1500)
        meta = run_ray_training("dundi", cfg, tmp_path / "r",
                                RayOptions(workers=workers, gpu=True, data_dir=data_dir, oracles=5))
    finally:
        ray.shutdown()
    assert meta["ray"]["gpu"] and meta["ray"]["workers"] == workers
