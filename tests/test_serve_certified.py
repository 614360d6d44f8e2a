"""Certified answers over HTTP: for a run trained with ``dundi train --certified`` (its rule
ranks by the squared Euclidean distance), every answer of every backend carries the
``certified_radius`` of the answered label, equal to ``Run.certifier(TwoStepRule(n, m, k)).radius`` on the
same images; for any other run the field is null; swapping n, m, k swaps the certifier.

The plain app is tested in-process; one real Ray Serve app (over HTTP on 127.0.0.1) checks the
same on the Serve backend, including a swap through POST /admin/reload."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from dundi.robustness.certificate import RADIUS_STEPS
from dundi.rule.params import TwoStepRule

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

RESOLUTION = 2.0 ** -RADIUS_STEPS  # Certifier.radius resolves [0, 1] to this
ADMIN = "certified-admin-token"


@pytest.fixture(scope="module")
def images(data_dir) -> np.ndarray:
    from dundi.data import load_split

    x, _, _ = load_split("mnist-10k", "test", data_dir, limit=24)
    return x


def expected_radii(run_dir: Path, x: np.ndarray, n: int | None = None, m: int = 3, k: int = 5
                   ) -> tuple[list[int], np.ndarray]:
    """The labels Run.classify answers and Run.certifier(TwoStepRule(n, m, k)).radius for those labels."""
    from dundi.run.directory import Run

    run = Run.load(run_dir)
    labels = run.classify(x, TwoStepRule(n, m, k)).labels
    radius = run.certifier(TwoStepRule(n, m, k)).radius(torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64)))
    return labels.tolist(), radius.numpy()


def v2(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def served(c, x: np.ndarray) -> tuple[list[int], list, list]:
    """(labels, v2 radii, /classify radii) for one request of ``x`` on each route."""
    r = c.post("/v2/models/dundi/infer", json=v2(x))
    assert r.status_code == 200, r.text[:300]
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["certified_radius"]["datatype"] == "FP64" and outputs["certified_radius"]["shape"] == [len(x)]
    r2 = c.post("/classify", json=x.tolist())
    assert r2.status_code == 200, r2.text[:300]
    results = r2.json()["results"]
    assert [res["label"] for res in results] == outputs["label"]["data"]
    return outputs["label"]["data"], outputs["certified_radius"]["data"], [res["certified_radius"] for res in results]


def check_radii(c, run_dir: Path, x: np.ndarray, **nmk) -> np.ndarray:
    labels, v2_radii, classify_radii = served(c, x)
    want_labels, want = expected_radii(run_dir, x, **nmk)
    assert labels == want_labels
    assert v2_radii == classify_radii
    np.testing.assert_allclose(np.asarray(v2_radii, dtype=np.float64), want, rtol=0, atol=RESOLUTION)
    return want


# ---------------------------------------------------------------------------- plain app

def client(run_dir: Path):
    from fastapi.testclient import TestClient

    from dundi.serving import ModelConfig, ServeSettings
    from dundi.serving.app import LocalBackend, create_app

    return TestClient(create_app(LocalBackend(ModelConfig(str(run_dir))),
                                 ServeSettings.create(use_env=False, admin_token=ADMIN)))


def test_plain_app_answers_carry_the_certified_radius(certified_run, images):
    c = client(certified_run)
    meta = c.get("/v2/models/dundi").json()
    assert meta["parameters"]["certified"] is True and meta["parameters"]["metric"] == "sqeuclidean"
    radii = check_radii(c, certified_run, images)
    assert (radii > 0).any(), radii  # the tiny run certifies some answers: the check is not vacuous
    # another n, m, k: another certifier
    r = c.post("/admin/reload", json={"n": 10, "m": 2, "k": 3}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    other = check_radii(c, certified_run, images, n=10, m=2, k=3)
    assert not np.array_equal(other, radii)
    # abstained answers name no label, so they carry no radius
    r = c.post("/admin/reload", json={"abstain_threshold": 1e-9}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    results = c.post("/classify", json=images[:3].tolist()).json()["results"]
    assert [(res["abstained"], res["certified_radius"]) for res in results] == [(True, None)] * 3


def test_a_certified_run_served_without_certificates_answers_null(certified_run, images):
    """certificates=false (`dundi serve --no-certificates`): the same labels, no radius, the
    metadata says so; asking for certify_eps with it is a 422 naming the conflict."""
    c = client(certified_run)
    labels, _, _ = served(c, images[:6])
    auth = {"Authorization": f"Bearer {ADMIN}"}
    r = c.post("/admin/reload", json={"certificates": False}, headers=auth)
    assert r.status_code == 200, r.text
    assert c.get("/v2/models/dundi").json()["parameters"]["certified"] is False
    assert served(c, images[:6]) == (labels, [None] * 6, [None] * 6)
    r = c.post("/admin/reload", json={"certificates": False, "certify_eps": 0.1}, headers=auth)
    assert r.status_code == 422 and "certify_eps" in r.text
    r = c.post("/admin/reload", json={"certificates": "no"}, headers=auth)
    assert r.status_code == 422 and "not true or false" in r.text


def test_uncertified_run_answers_null(mnist_runs, images):
    c = client(mnist_runs["dundi"])
    assert c.get("/v2/models/dundi").json()["parameters"]["certified"] is False
    labels, v2_radii, classify_radii = served(c, images[:5])
    assert len(labels) == 5 and v2_radii == classify_radii == [None] * 5


# ---------------------------------------------------------------------------- Ray Serve

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_serve_answers_carry_the_certified_radius_and_swap_it(ray_local, certified_run, mnist_runs, images):
    from ray import serve

    from dundi.distributed.serve_app import ServeAppArgs, deploy, shutdown
    from dundi.serving.settings import hash_token

    port = free_port()
    deploy(ServeAppArgs(run=str(certified_run), replica_cpus=0.1, admin_token_sha256=hash_token(ADMIN)),
           host="127.0.0.1", port=port)
    try:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            radii = check_radii(c, certified_run, images)
            assert (radii > 0).any(), radii
            r = c.post("/admin/reload", json={"n": 10, "m": 2, "k": 3}, headers=admin)
            assert r.status_code == 200, r.text
            check_radii(c, certified_run, images, n=10, m=2, k=3)
            # swapping to an uncertified run: null radii
            r = c.post("/admin/reload", json={"run": str(mnist_runs["dundi"]), "n": None, "m": 3, "k": 5},
                       headers=admin)
            assert r.status_code == 200, r.text
            _, v2_radii, classify_radii = served(c, images[:4])
            assert v2_radii == classify_radii == [None] * 4
    finally:
        shutdown()
        serve.shutdown()
