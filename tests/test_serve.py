"""The DunDi endpoint on real Ray Serve, over HTTP on 127.0.0.1: answers equal the offline
two-step classifier, every bad input gets a JSON 4xx, loopback load has no errors, and an
index swap under load drops none. (A replica killed under load is tested through `dundi serve`
with its default HAProxy ingress, which retries the requests the replica held:
test_serve_cli.py.)

One Serve app (ingress + 2 classifier replicas) serves the whole module (~10 s to start)."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from dundi.rule.params import TwoStepRule

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.realdata]

ADMIN = {"Authorization": "Bearer admin-test-token"}
MAX_BATCH = 64
MAX_BODY = 2_000_000
LOAD_S = 15.0          # seconds of loopback load per load test
CLIENTS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def v2(x: np.ndarray, datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": datatype,
                        "data": x.ravel().tolist()}]}


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.rint(img[0] * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sample_images(data_dir):
    from dundi.data import load_split

    x, y, _ = load_split("mnist-10k", "test", data_dir, limit=96)
    return x, y


@pytest.fixture(scope="module")
def serve_url(ray_local, mnist_runs):
    from ray import serve

    from dundi.distributed.serve_app import ServeAppArgs, deploy, shutdown
    from dundi.serving.settings import hash_token

    port = free_port()
    args = ServeAppArgs(run=str(mnist_runs["dundi"]), replicas=2, replica_cpus=0.1,
                        max_request_batch=MAX_BATCH, max_body_bytes=MAX_BODY, request_timeout_s=20,
                        admin_token_sha256=hash_token("admin-test-token"))
    t0 = time.time()
    deploy(args, host="127.0.0.1", port=port)
    print(f"serve app up in {time.time() - t0:.1f} s")
    yield f"http://127.0.0.1:{port}"
    shutdown()
    serve.shutdown()


@pytest.fixture(scope="module")
def http(serve_url):
    with httpx.Client(base_url=serve_url, timeout=30) as c:
        yield c


def labels_of(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return next(o for o in response.json()["outputs"] if o["name"] == "label")["data"]


# ---------------------------------------------------------------------------- answers

def test_health_and_metadata(http):
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get("/v2/models/dundi/ready").status_code == 200
    meta = http.get("/v2/models/dundi").json()
    assert meta["name"] == "dundi" and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert meta["parameters"]["n"] == 10 and meta["parameters"]["k"] == 5


def test_answers_equal_dundi_classify(http, mnist_runs, sample_images, data_dir):
    """v2 JSON, PNG uploads and /classify JSON give Run.classify's answers on a real test slice,
    and the accuracy `dundi classify --limit` prints."""
    from dundi.run.directory import Run
    from dundi.run.pipeline import classify_split

    x, y = sample_images
    expected = Run.load(mnist_runs["dundi"]).classify(x)
    r = http.post("/v2/models/dundi/infer", json={**v2(x[:48]), "id": "req-1"})
    assert r.json()["id"] == "req-1"
    got = labels_of(r) + labels_of(http.post("/v2/models/dundi/infer", json=v2(x[48:, 0])))  # (N, H, W)
    assert got == expected.labels.tolist()
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    np.testing.assert_array_equal(np.reshape(outputs["kept_classes"]["data"], (48, 5)), expected.topk_classes[:48])
    np.testing.assert_allclose(np.reshape(outputs["fine_scores"]["data"], (48, 5)), expected.fine_scores[:48], rtol=1e-4, atol=5e-3)
    np.testing.assert_allclose(outputs["nearest_oracle_distance"]["data"], expected.nearest_distance[:48], atol=2e-3)
    accuracy = float(np.mean(np.array(got) == y))
    assert accuracy == pytest.approx(classify_split(mnist_runs["dundi"], data_dir=data_dir, limit=len(y))["accuracy"])

    files = [("file", (f"{i}.png", png(x[i]), "image/png")) for i in range(16)]
    results = http.post("/classify", files=files).json()["results"]
    assert [res["label"] for res in results] == expected.labels[:16].tolist()
    one = http.post("/classify", content=png(x[0]), headers={"Content-Type": "image/png"}).json()["results"][0]
    assert one["label"] == expected.labels[0] and len(one["kept_classes"]) == 5 and len(one["class_scores"]) == 5
    assert one["class_scores"][0]["class"] == one["label"]  # the final scores, best first
    as_json = http.post("/classify", json=x[:8].tolist()).json()["results"]
    assert [res["label"] for res in as_json] == expected.labels[:8].tolist()


# ---------------------------------------------------------------------------- bad input

def _chunks(total: int):
    for _ in range(total // 65536 + 1):
        yield b"0" * 65536


GOOD = np.full((1, 28, 28), 0.5, np.float32)
BAD_INPUTS = {
    # name: (method, path, request kwargs, status, code)
    "wrong_shape": ("POST", "/v2/models/dundi/infer", {"json": v2(np.zeros((1, 27, 28), np.float32))}, 422, "bad_shape"),
    "shape_vs_data": ("POST", "/v2/models/dundi/infer",
                      {"json": {"inputs": [{"name": "images", "shape": [2, 28, 28], "datatype": "FP32",
                                            "data": [0.5] * 784}]}}, 422, "bad_shape"),
    "wrong_dtype": ("POST", "/v2/models/dundi/infer", {"json": v2(GOOD, "INT64")}, 422, "bad_dtype"),
    "non_numeric": ("POST", "/v2/models/dundi/infer",
                    {"json": {"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "FP32",
                                          "data": ["x"] * 784}]}}, 422, "bad_dtype"),
    "nan": ("POST", "/v2/models/dundi/infer", {"content": b'{"inputs":[{"name":"images","shape":[1,28,28],'
                                               b'"datatype":"FP32","data":[NaN' + b",0.5" * 783 + b"]}]}",
                                               "headers": {"Content-Type": "application/json"}}, 422, "non_finite"),
    "inf": ("POST", "/classify", {"content": b"[[" + b"],[".join([b"Infinity" + b",0" * 27] + [b"0" + b",0" * 27] * 27)
                                  + b"]]", "headers": {"Content-Type": "application/json"}}, 422, "non_finite"),
    "out_of_range": ("POST", "/v2/models/dundi/infer", {"json": v2(GOOD * 255)}, 422, "out_of_range"),
    "negative": ("POST", "/classify", {"json": (GOOD - 1).tolist()}, 422, "out_of_range"),
    "empty_batch": ("POST", "/v2/models/dundi/infer", {"json": v2(np.zeros((0, 1, 28, 28), np.float32))}, 422, "empty_batch"),
    "empty_json_array": ("POST", "/classify", {"json": []}, 422, "empty_batch"),
    "empty_upload": ("POST", "/classify", {"files": [("note", (None, b"hi"))]}, 422, "empty_batch"),
    "oversized_batch": ("POST", "/v2/models/dundi/infer",
                        {"json": v2(np.zeros((MAX_BATCH + 1, 1, 28, 28), np.float32))}, 413, "batch_too_large"),
    "oversized_body": ("POST", "/v2/models/dundi/infer", {"content": b"0" * (MAX_BODY + 1),
                                                          "headers": {"Content-Type": "application/json"}},
                       413, "body_too_large"),
    "oversized_chunked_body": ("POST", "/classify", {"content": _chunks(MAX_BODY + 1),
                                                     "headers": {"Content-Type": "application/json"}},
                               413, "body_too_large"),
    "malformed_json": ("POST", "/v2/models/dundi/infer", {"content": b'{"inputs": [', "headers":
                                                          {"Content-Type": "application/json"}}, 400, "malformed_json"),
    "empty_body": ("POST", "/v2/models/dundi/infer", {"content": b"", "headers": {"Content-Type": "application/json"}},
                   400, "malformed_json"),
    "json_not_object": ("POST", "/v2/models/dundi/infer", {"json": [1, 2]}, 400, "invalid_request"),
    "missing_inputs": ("POST", "/v2/models/dundi/infer", {"json": {"id": "x"}}, 400, "invalid_request"),
    "unknown_input": ("POST", "/v2/models/dundi/infer",
                      {"json": {"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "FP32",
                                            "data": [0.5] * 784}]}}, 400, "unknown_input"),
    "broken_image": ("POST", "/classify", {"content": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20,
                                           "headers": {"Content-Type": "image/png"}}, 400, "broken_image"),
    "truncated_png": ("POST", "/classify", {"files": [("file", ("t.png", png(np.random.default_rng(0).random(
        (1, 28, 28), dtype=np.float32))[:300], "image/png"))]}, 400, "broken_image"),
    "not_an_image": ("POST", "/classify", {"files": [("file", ("t.png", b"hello world", "image/png"))]},
                     400, "broken_image"),
    "wrong_image_size": ("POST", "/classify", {"content": png(np.zeros((1, 32, 32), np.float32)),
                                               "headers": {"Content-Type": "image/png"}}, 422, "bad_image_size"),
    "unknown_model": ("POST", "/v2/models/resnet/infer", {"json": v2(GOOD)}, 404, "unknown_model"),
    "unknown_model_metadata": ("GET", "/v2/models/resnet", {}, 404, "unknown_model"),
    "unknown_version": ("POST", "/v2/models/dundi/versions/nope/infer", {"json": v2(GOOD)}, 404, "unknown_version"),
    "wrong_content_type_v2": ("POST", "/v2/models/dundi/infer", {"content": png(GOOD),
                                                                 "headers": {"Content-Type": "image/png"}},
                              415, "unsupported_media_type"),
    "wrong_content_type_classify": ("POST", "/classify", {"content": b"a,b", "headers": {"Content-Type": "text/csv"}},
                                    415, "unsupported_media_type"),
    "gif_upload": ("POST", "/classify", {"files": [("file", ("a.gif", b"GIF89a", "image/gif"))]},
                   415, "unsupported_media_type"),
    "unknown_route": ("GET", "/v1/models/dundi", {}, 404, "not_found"),
    "wrong_method": ("GET", "/classify", {}, 405, "method_not_allowed"),
    "admin_without_token": ("POST", "/admin/reload", {"json": {"k": 3}}, 401, "unauthorized"),
    "admin_wrong_token": ("POST", "/admin/reload", {"json": {"k": 3}, "headers": {"Authorization": "Bearer x"}},
                          403, "forbidden"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_json_4xx(http, case):
    method, path, kwargs, status, code = BAD_INPUTS[case]
    r = http.request(method, path, timeout=15, **kwargs)
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert code is None or body["code"] == code, body
    if status not in (401, 403, 404, 405):
        assert body.get("expected"), body  # says what would be accepted


def test_still_serving_after_bad_input(http, sample_images):
    x, _ = sample_images
    assert http.get("/v2/health/ready").status_code == 200
    assert len(labels_of(http.post("/v2/models/dundi/infer", json=v2(x[:4])))) == 4


# ---------------------------------------------------------------------------- load

async def _load(url: str, bodies: list[dict], clients: int, seconds: float, per_client_max: int = 5000,
                during=None, warm_after: int = 100) -> dict:
    """Closed-loop load: ``clients`` concurrent clients, bounded in time and count. ``during``
    (an async callable given an event set once ``warm_after`` requests were answered) runs
    alongside, e.g. a reload."""
    stats = {"ok": 0, "failed": 0, "statuses": {}, "versions": []}
    deadline = time.monotonic() + seconds
    warm = asyncio.Event()

    async def one(c: httpx.AsyncClient, j: int) -> None:
        for i in range(per_client_max):
            if time.monotonic() > deadline:
                return
            try:
                r = await c.post("/v2/models/dundi/infer", json=bodies[(i * clients + j) % len(bodies)])
                status = r.status_code
                if status == 200:
                    stats["versions"].append((time.monotonic(), r.json()["model_version"]))
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            stats["ok" if status == 200 else "failed"] += 1
            if status != 200:
                stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
            if stats["ok"] >= warm_after:
                warm.set()

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
        tasks = [one(c, j) for j in range(clients)]
        if during is not None:
            tasks.append(during(warm))
        results = await asyncio.gather(*tasks)
    stats["during"] = results[-1] if during is not None else None
    return stats


def test_loopback_load_has_no_errors(serve_url, sample_images):
    x, _ = sample_images
    bodies = [v2(x[i:i + 1]) for i in range(32)]
    stats = asyncio.run(_load(serve_url, bodies, CLIENTS, LOAD_S))
    print(f"load: {stats['ok']} ok in {LOAD_S} s with {CLIENTS} clients ({stats['ok'] / LOAD_S:.0f} req/s)")
    assert stats["failed"] == 0, stats["statuses"]
    assert stats["ok"] >= CLIENTS, f"only {stats['ok']} answers for {CLIENTS} clients in {LOAD_S} s"


def _replica_actors(expected: int, timeout: float = 60) -> list[str]:
    from ray import serve

    handle = serve.get_deployment_handle("DunDi", app_name="dundi")
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < expected and time.monotonic() < deadline:
        seen.update(handle.describe.remote().result(timeout_s=10)["actor_name"] for _ in range(8))
    return sorted(seen)


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_index_swap_during_load_drops_nothing(serve_url, http, mnist_runs, sample_images, tmp_path, data_dir):
    from dundi.run.directory import Run
    from dundi.run.pipeline import build_index

    x, _ = sample_images
    original = str(mnist_runs["dundi"])
    other = _copy_run(mnist_runs["dundi"], tmp_path / "other")
    build_index(other, n=8, seed=7, data_dir=data_dir)  # another verified oracle index
    before = http.get("/v2/models/dundi").json()["versions"][0]
    actors = _replica_actors(2)

    async def swap(warm: asyncio.Event) -> dict:
        await asyncio.wait_for(warm.wait(), 60)  # under load first: 100 answers, not a sleep
        async with httpx.AsyncClient(base_url=serve_url, timeout=120) as c:
            r = await c.post("/admin/reload", json={"run": str(other), "n": None}, headers=ADMIN)
        return {"status": r.status_code, "body": r.json(), "at": time.monotonic()}

    stats = asyncio.run(_load(serve_url, [v2(x[i:i + 1]) for i in range(32)], 16, 12.0, during=swap))
    swap_result = stats["during"]
    assert swap_result["status"] == 200, swap_result["body"]
    assert stats["failed"] == 0, stats["statuses"]
    after = swap_result["body"]["model"]["version"]
    assert after != before and swap_result["body"]["replicas"] == 2
    late = {v for t, v in stats["versions"] if t > swap_result["at"] + 0.5}
    assert late == {after}, late  # once the reload answered, every replica serves the new index
    assert _replica_actors(2) == actors  # reconfigured in place: the same replica actors

    # the new index answers like the offline classifier of the new run
    new = Run.load(other).classify(x[:32])
    assert labels_of(http.post("/v2/models/dundi/infer", json=v2(x[:32]))) == new.labels.tolist()
    assert http.get("/v2/models/dundi").json()["parameters"]["n"] == 8

    # n, m, k alone
    r = http.post("/admin/reload", json={"k": 10, "m": 2}, headers=ADMIN)
    assert r.status_code == 200, r.text
    expected = Run.load(other).classify(x[:32], TwoStepRule(m=2, k=10)).labels.tolist()
    assert labels_of(http.post("/v2/models/dundi/infer", json=v2(x[:32]))) == expected

    # failed loads keep the old model and answer 4xx
    current = http.get("/v2/models/dundi").json()["versions"][0]
    tampered = _copy_run(other, tmp_path / "tampered")
    from dundi.run.storage import index_file_key, read_meta

    with open(tampered / index_file_key(read_meta(tampered)), "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    for changes, code in [({"run": str(tampered)}, "reload_failed"), ({"run": str(tmp_path / "missing")}, "reload_failed"),
                          ({"n": 50}, "reload_failed"), ({"k": "five"}, "invalid_config"),
                          ({"colour": "red"}, "invalid_config")]:
        r = http.post("/admin/reload", json=changes, headers=ADMIN)
        assert r.status_code == 422 and r.json()["code"] == code, r.text
    assert "sha256" in http.post("/admin/reload", json={"run": str(tampered)}, headers=ADMIN).json()["error"]
    assert http.get("/v2/models/dundi").json()["versions"][0] == current
    assert len(labels_of(http.post("/v2/models/dundi/infer", json=v2(x[:4])))) == 4

    # abstain threshold through the same route: a tiny threshold answers "unknown"
    r = http.post("/admin/reload", json={"abstain_threshold": 1e-6}, headers=ADMIN)
    assert r.status_code == 200
    assert labels_of(http.post("/v2/models/dundi/infer", json=v2(x[:4]))) == [-1] * 4
    assert http.post("/classify", json=x[:1].tolist()).json()["results"][0]["class_name"] == "unknown"

    # back to the deployed configuration
    r = http.post("/admin/reload", json={"run": original, "n": None, "m": 3, "k": 5, "abstain_threshold": None},
                  headers=ADMIN)
    assert r.status_code == 200 and r.json()["model"]["version"] == before


def test_serve_config_yaml_builds_the_app():
    """cluster/serve_config.yaml is a valid Serve deploy config whose args build the app."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from dundi.distributed.serve_app import ServeAppArgs, app_builder

    path = Path(__file__).resolve().parents[1] / "cluster" / "serve_config.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = config.applications[0]
    assert app.import_path == "dundi.distributed.serve_app:app_builder"
    built = app_builder(ServeAppArgs.model_validate(app.args))
    assert type(built).__name__ == "Application"
    assert [d.name for d in app.deployments] == ["DunDi"]
    deployment = app.deployments[0]
    assert set(deployment.user_config) >= {"run", "n", "m", "k", "abstain_threshold"}
    assert deployment.autoscaling_config["max_replicas"] >= deployment.autoscaling_config["min_replicas"]


def test_serve_config_yaml_deploys_and_reconfigures_in_place(serve_url, http, mnist_runs, tmp_path, data_dir,
                                                            sample_images):
    """Apply cluster/serve_config.yaml the way `serve deploy` does (declaratively, through the
    Serve controller; the dashboard's REST API is not running here), then change only the
    user_config: Serve reconfigures the running replica in place (same actor). The app that
    `deploy` (as `dundi serve`) started is declared the same way and keeps running."""
    import yaml
    from ray import serve

    from dundi.distributed.serve_app import apply_app
    from dundi.run.directory import Run
    from dundi.run.pipeline import build_index

    x, _ = sample_images
    other = _copy_run(mnist_runs["dundi"], tmp_path / "yaml-other")
    build_index(other, n=6, seed=11, data_dir=data_dir)
    path = Path(__file__).resolve().parents[1] / "cluster" / "serve_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    app = cfg["applications"][0]
    app.update(name="dundi_yaml", route_prefix="/yaml")
    app["args"]["run"] = str(mnist_runs["dundi"])
    (d,) = app["deployments"]
    d["ray_actor_options"]["num_cpus"] = 0.05
    d["user_config"]["run"] = str(mnist_runs["dundi"])
    d["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=1)
    try:
        apply_app(app)
        handle = serve.get_deployment_handle("DunDi", app_name="dundi_yaml")
        with httpx.Client(base_url=f"{serve_url}/yaml", timeout=30) as c:
            assert labels_of(c.post("/v2/models/dundi/infer", json=v2(x[:16]))) == \
                Run.load(mnist_runs["dundi"]).classify(x[:16]).labels.tolist()
            actor = handle.describe.remote().result(timeout_s=30)["actor_name"]
            d["user_config"].update(run=str(other), k=3)
            apply_app(app)
            deadline = time.monotonic() + 60
            while c.get("/v2/models/dundi").json()["parameters"]["k"] != 3 and time.monotonic() < deadline:
                time.sleep(0.5)
            meta = c.get("/v2/models/dundi").json()["parameters"]
            assert (meta["run"], meta["k"], meta["n"]) == (other.name, 3, 6)
            assert labels_of(c.post("/v2/models/dundi/infer", json=v2(x[:16]))) == \
                Run.load(other).classify(x[:16], TwoStepRule(k=3)).labels.tolist()
            assert handle.describe.remote().result(timeout_s=30)["actor_name"] == actor  # not restarted
        assert http.get("/v2/health/ready").status_code == 200  # the first app still runs
    finally:
        serve.delete("dundi_yaml")
