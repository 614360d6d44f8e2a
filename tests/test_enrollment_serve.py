"""Enrolling a class in a running service (POST /admin/classes) under a steady stream of
classify requests, on the plain app under uvicorn and on Ray Serve, over HTTP on 127.0.0.1:
every request answers 200, and afterwards the service answers that class's test images
exactly as the offline classifier of the new index version does, and exactly as the index
built with the class in it did: the class is removed from a built index and enrolled again
from the same oracle images, so only its name and label change."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.test_serve_cli import free_port, v2
from waiting import wait_until

pytestmark = [pytest.mark.realdata]

ADMIN = {"Authorization": "Bearer admin-test-token"}
HELD_OUT = 7          # the digit removed from the subject's index, then enrolled while serving
CLIENTS = 4           # request threads
AROUND = 4 * CLIENTS  # requests answered before the enrollment starts, and again after it ends
DEADLINE_S = 120      # for each of those, on a busy machine


@pytest.fixture(scope="module")
def digits(data_dir):
    """Test images of the held-out digit and a stream of the others."""
    from dundi.data import load_split

    xte, yte, _ = load_split("mnist-10k", "test", data_dir)
    return {"held_out_test": xte[yte == HELD_OUT], "stream": xte[yte != HELD_OUT][:32]}


@pytest.fixture()
def subject(mnist_runs, tmp_path, data_dir, digits) -> tuple[Path, np.ndarray, list[str]]:
    """A copy of the small mnist run whose index lacks the held-out digit; the digit's oracle
    images as built, arranged so the seeded pick of the enrollment (seed 0, all of them)
    restores the built order; and the built index's answers (names) on the digit's test images."""
    from dundi.data import load_split
    from dundi.run.directory import Run
    from dundi.run.enrollment import remove_class

    built = Run.load(mnist_runs["dundi"])
    label = built.class_names.index(str(HELD_OUT))
    per_class = built.oracle.class_counts()
    start = int(per_class[:label].sum())
    oracle_ids = np.asarray(built.oracle.meta["ids"][start:start + per_class[label]])
    xtr, _, ids = load_split("mnist-10k", "train", data_dir)
    ordered = xtr[[int(np.flatnonzero(ids == i)[0]) for i in oracle_ids]]
    pick = np.random.default_rng(0).choice(np.arange(len(ordered)), len(ordered), replace=False)
    enroll = np.empty_like(ordered)
    enroll[pick] = ordered  # enroll[pick] is the built order again
    answers = built.classify(digits["held_out_test"])
    names = [built.class_names[i] for i in answers.labels]
    run = tmp_path / "subject"
    shutil.copytree(mnist_runs["dundi"], run)
    remove_class(run, str(HELD_OUT))
    return run, enroll, names


def _stream(url: str, bodies: list[dict], stop: threading.Event, statuses: list) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        i = 0
        while not stop.is_set():
            try:
                statuses.append(c.post("/v2/models/dundi/infer", json=bodies[i % len(bodies)]).status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)
            i += 1


def enroll_under_load(url: str, subject: tuple, digits: dict) -> int:
    """The shared check: stream, enroll mid-stream, then compare with the offline classifier."""
    from dundi.run.directory import Run

    run, enroll, built_names = subject

    stop, statuses = threading.Event(), []
    bodies = [v2(digits["stream"][i:i + 1]) for i in range(len(digits["stream"]))]
    threads = [threading.Thread(target=_stream, args=(url, bodies, stop, statuses)) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(statuses) >= AROUND, f"{AROUND} answers before enrolling", DEADLINE_S)
        before = len(statuses)
        with httpx.Client(base_url=url, timeout=180) as c:
            r = c.post("/admin/classes", headers=ADMIN,
                       json={"add": "seven", "images": enroll.tolist()})
        after = len(statuses)
        during = after - before
        wait_until(lambda: len(statuses) >= after + AROUND, f"{AROUND} answers after enrolling", DEADLINE_S)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["added"] == {"class": "seven", "images": len(enroll), "oracles": len(enroll)}
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert during > 0  # requests were answered while the class was being enrolled
    print(f"{len(statuses)} requests, all 200, {during} while enrolling; index version {body['index_version']}")

    x = digits["held_out_test"]
    with httpx.Client(base_url=url, timeout=60) as c:
        meta = c.get("/v2/models/dundi").json()["parameters"]
        assert meta["class_names"][-1] == "seven" and meta["index_version"] == body["index_version"]
        out = {o["name"]: o["data"] for o in c.post("/v2/models/dundi/infer", json=v2(x)).json()["outputs"]}
    offline = Run.load(run, index_version=body["index_version"])
    expected = offline.classify(x)
    assert out["label"] == expected.labels.tolist()
    assert out["class_name"] == [offline.class_names[i] for i in expected.labels]
    assert out["class_name"] == ["seven" if n == str(HELD_OUT) else n for n in built_names]
    rate = float(np.mean(np.array(out["class_name"]) == "seven"))
    print(f"held-out digit {HELD_OUT} answered 'seven' for {rate:.1%} of its {len(x)} test images")
    return body["index_version"]


def test_plain_app_enrolls_a_class_under_load(subject, digits):
    import uvicorn

    from dundi.serving.app import LocalBackend, create_app
    from dundi.serving.model import ModelConfig
    from dundi.serving.settings import ServeSettings, hash_token

    port = free_port()
    app = create_app(LocalBackend(ModelConfig(str(subject[0]))),
                     ServeSettings(admin_token_sha256=hash_token("admin-test-token")))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "uvicorn to start serving", 30)
        enroll_under_load(f"http://127.0.0.1:{port}", subject, digits)
        # and removal: the class is gone from the answers
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            r = c.post("/admin/classes", headers=ADMIN, json={"remove": "seven"})
            assert r.status_code == 200, r.text
            assert "seven" not in c.get("/v2/models/dundi").json()["parameters"]["class_names"]
            refused = c.post("/admin/classes", headers=ADMIN, json={"remove": "seven"})
            assert refused.status_code == 409 and "has no class" in refused.json()["error"]
            assert c.post("/admin/classes", json={"remove": "0"}).status_code == 401
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_serve_enrolls_a_class_under_load(ray_local, subject, digits):
    from ray import serve

    from dundi.distributed.serve_app import ServeAppArgs, deploy, shutdown
    from dundi.serving.settings import hash_token

    port = free_port()
    args = ServeAppArgs(run=str(subject[0]), replicas=2, replica_cpus=0.1, request_timeout_s=30,
                        admin_token_sha256=hash_token("admin-test-token"))
    deploy(args, host="127.0.0.1", port=port)
    try:
        version = enroll_under_load(f"http://127.0.0.1:{port}", subject, digits)
        # every replica serves the new version: metadata from several requests agrees
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            versions = {c.get("/v2/models/dundi").json()["parameters"]["index_version"] for _ in range(16)}
        assert versions == {version}, versions
    finally:
        shutdown()
        serve.shutdown()
