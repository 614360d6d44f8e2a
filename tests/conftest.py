"""Shared fixtures: a real local Ray, the real-data cache, and small trained runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """GPU tests skip, with the reason in the summary, where PyTorch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here: run `pytest -m gpu -rs` (or bench/gpu_check.sh) "
                                   "on a machine with one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> str:
    """Real datasets are cached once per machine (DUNDI_DATA_DIR, else the user cache dir)."""
    from dundi.data.cache import resolve_data_dir

    return str(resolve_data_dir(os.environ.get("DUNDI_DATA_DIR")))


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs, fresh for each test module: what one module leaves
    behind (Train controllers, Serve actors, killed workers) never meets the next."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mnist_runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """A small native LeNet-5 and a DunDi_R run on a real mnist-10k slice, with an oracle
    index of n=10: the shared subject of classify, serve and evaluation tests (~10 s)."""
    from dundi.run.pipeline import build_index, train_dundi_run, train_native_run
    from dundi.training.config import TrainConfig

    root = tmp_path_factory.mktemp("runs")
    native = TrainConfig("mnist-10k", "lenet5", epochs=4, batch_size=64, limit=3000)
    dundi = TrainConfig("mnist-10k", "lenet5", epochs=2, limit=3000, tuples=6000)
    train_native_run(native, root / "native", data_dir, progress=False, log=lambda s: None)
    train_dundi_run(dundi, root / "dundi", None, data_dir, progress=False, log=lambda s: None)
    build_index(root / "dundi", n=10, seed=0, data_dir=data_dir)
    return {"native": root / "native", "dundi": root / "dundi"}


@pytest.fixture(scope="session")
def certified_run(tmp_path_factory, data_dir) -> Path:
    """A small certified DunDi run (cnn-ibp, interval-bound training at eps 0.1, squared
    Euclidean rule) on a real mnist-10k slice, with an oracle index of n=10 (~30 s)."""
    from dundi.run.pipeline import build_index, train_dundi_run
    from dundi.training.config import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "certified"
    # a gentle schedule: with 1 clean epoch and a 3-epoch ramp this slice collapsed to chance
    cfg = TrainConfig("mnist-10k", "cnn-ibp", epochs=8, limit=3000, metric="sqeuclidean",
                      certified=True, cert_eps=0.1, cert_warmup=2.0, cert_ramp=4.0, cert_per_class=10)
    train_dundi_run(cfg, out, None, data_dir, progress=False, log=lambda s: None)
    build_index(out, n=10, seed=0, data_dir=data_dir)
    return out
