"""The oracle index with FAISS on a GPU: the step-1 shortlist (IVF on the GPU) and the exact
distance path give the CPU float64 reference's answers, ragged classes included, and every
call shares one GPU resource object. Marked ``gpu``; skipped without a FAISS GPU build."""

import numpy as np
import pytest
import torch

from dundi.rule.params import TwoStepRule
from dundi.rule.reference import two_step_reference
from rule_helpers import resolved

pytestmark = [pytest.mark.gpu]


@pytest.fixture(scope="module")
def faiss_gpu():
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        pytest.skip("this FAISS build has no GPU support (pip uninstall faiss-cpu; pip install 'dundi[gpu]')")
    return faiss


def test_gpu_paths_equal_the_reference_with_ragged_classes(faiss_gpu):
    from dundi.rule import search as oracle_search
    from dundi.rule.index import OracleIndex

    rng = np.random.default_rng(0)
    counts = rng.integers(1, 21, size=300)
    centres = rng.normal(size=(300, 32))
    rows = [centres[c] + 0.5 * rng.normal(size=(cnt, 32)) for c, cnt in enumerate(counts)]
    padded = np.zeros((300, 20, 32), np.float32)
    for c, r in enumerate(rows):
        padded[c, :len(r)] = r
    vectors = np.concatenate(rows).astype(np.float32)
    queries = (centres[rng.integers(300, size=200)] + 0.5 * rng.normal(size=(200, 32))).astype(np.float32)
    ref = two_step_reference(torch.from_numpy(queries), torch.from_numpy(padded),
                             resolved(padded, TwoStepRule(20, 3, 5), counts=counts), counts=counts.tolist()).numpy()
    exact = OracleIndex(vectors, counts=counts, full_limit=0)
    listed = OracleIndex(vectors, counts=counts, full_limit=0, exact_coarse_limit=0, shortlist=300, nprobe=2048)
    np.testing.assert_array_equal(exact.classify(queries, TwoStepRule(20, 3, 5)).labels, ref)
    np.testing.assert_array_equal(listed.classify(queries, TwoStepRule(20, 3, 5)).labels, ref)
    assert listed._coarse[3].kind == "ivf"  # the kind that runs on the GPU
    assert "Gpu" in type(listed._coarse[3].index).__name__
    assert oracle_search.gpu_resources() is oracle_search.gpu_resources()
