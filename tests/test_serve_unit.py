"""The endpoint's Ray-free parts: input validation, image decoding, response shaping, the
FastAPI app over an in-process model (auth, admin, abstain). No Ray here; the same app behind
real Ray Serve is tested in test_serve.py."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from dundi.serving import ModelConfig, RequestError, ServeSettings
from dundi.serving.inputs import (
    InputSpec,
    decode_image,
    images_from_parts,
    parse_classify_json,
    parse_multipart,
    parse_v2_infer,
)
from dundi.serving.outputs import V2_OUTPUTS, dumps, v2_response

SPEC = InputSpec((1, 28, 28), max_batch=8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")  # uint16 arrays become 16-bit grayscale PNGs
    return buf.getvalue()


def v2(data, shape, datatype="FP32", name="images") -> dict:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


def refused(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args)
    body = info.value.body()
    assert body["error"] and body["code"], body
    return info.value


# ---------------------------------------------------------------------------- inputs

@pytest.mark.parametrize("shape", [[2, 1, 28, 28], [2, 28, 28], [1, 28, 28], [28, 28]])
def test_v2_layouts(shape):
    n = int(np.prod(shape)) // 784
    x = np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)
    req = parse_v2_infer(v2(x.ravel().tolist(), shape), SPEC, V2_OUTPUTS)
    np.testing.assert_array_equal(req.images, x)  # float32 → JSON → float32 is exact


def test_v2_uint8_is_scaled_like_the_dataset_cache():
    k = np.arange(784) % 256
    req = parse_v2_infer(v2(k.tolist(), [1, 28, 28], "UINT8"), SPEC, V2_OUTPUTS)
    np.testing.assert_array_equal(req.images.ravel(), np.divide(k.astype(np.uint8), np.float32(255), dtype=np.float32))


@pytest.mark.parametrize("body,status,code", [
    (v2([0.5] * 783, [1, 28, 28]), 422, "bad_shape"),
    (v2([0.5] * 784, [1, 1, 28, 27]), 422, "bad_shape"),
    (v2([0.5] * 784, [784]), 422, "bad_shape"),
    (v2([0] * 784, [1, 28, 28], "INT32"), 422, "bad_dtype"),
    (v2([True] * 784, [1, 28, 28]), 422, "bad_dtype"),
    (v2(["0.5"] * 784, [1, 28, 28]), 422, "bad_dtype"),
    (v2([None] * 784, [1, 28, 28]), 422, "bad_dtype"),
    (v2([[0.5] * 28] * 27 + [[0.5] * 27], [28, 28]), 422, "ragged_array"),
    (v2([2 ** 70] * 784, [1, 28, 28]), 422, "out_of_range"),
    (v2([1.5] * 784, [1, 28, 28]), 422, "out_of_range"),
    (v2([-0.1] * 784, [1, 28, 28]), 422, "out_of_range"),
    (v2([300] * 784, [1, 28, 28], "UINT8"), 422, "out_of_range"),
    (v2([0.5] * 784, [1, 28, 28], "UINT8"), 422, "bad_dtype"),
    (v2([float("nan")] * 784, [1, 28, 28]), 422, "non_finite"),
    (v2([float("inf")] * 784, [1, 28, 28]), 422, "non_finite"),
    (v2([], [0, 1, 28, 28]), 422, "empty_batch"),
    (v2([0.5] * 784 * 9, [9, 1, 28, 28]), 413, "batch_too_large"),
    (v2([0.5] * 784, [1, 28, 28], name="x"), 400, "unknown_input"),
    (v2([0.5] * 784, [1, 28.0, 28]), 400, "invalid_request"),
    ({"inputs": []}, 400, "invalid_request"),
    ({"inputs": [{"name": "images"}]}, 400, "invalid_request"),
    ([1, 2, 3], 400, "invalid_request"),
    ({**v2([0.5] * 784, [1, 28, 28]), "outputs": [{"name": "logits"}]}, 400, "unknown_output"),
    ({**v2([0.5] * 784, [1, 28, 28]), "extra": 1}, 400, "invalid_request"),
])
def test_v2_refusals(body, status, code):
    exc = refused(parse_v2_infer, body, SPEC, V2_OUTPUTS)
    assert (exc.status, exc.code) == (status, code), exc.body()


def test_classify_json_forms():
    x = np.random.default_rng(1).random((3, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(parse_classify_json(x.tolist(), SPEC), x[:, None])
    k = (x * 255).astype(np.uint8)
    got = parse_classify_json({"images": k.tolist(), "dtype": "uint8"}, SPEC)
    np.testing.assert_array_equal(got, np.divide(k, np.float32(255), dtype=np.float32)[:, None])
    assert refused(parse_classify_json, {"images": k.tolist(), "dtype": "int16"}, SPEC).code == "bad_dtype"
    assert refused(parse_classify_json, {"pixels": []}, SPEC).status == 400
    assert refused(parse_classify_json, [], SPEC).code == "empty_batch"


def test_png_decoding_is_exact_and_never_resizes():
    k = np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)
    expected = np.divide(k, np.float32(255), dtype=np.float32)[None]
    np.testing.assert_array_equal(decode_image(png(k), (1, 28, 28)), expected)
    rgb = np.stack([k, k, k], -1)  # gray RGB → L keeps the value
    np.testing.assert_array_equal(decode_image(png(rgb), (1, 28, 28)), expected)
    k16 = (k.astype(np.uint16) * 257)
    np.testing.assert_allclose(decode_image(png(k16), (1, 28, 28)), expected, atol=1e-6)
    out = decode_image(png(rgb), (3, 28, 28))
    assert out.shape == (3, 28, 28) and out.dtype == np.float32
    buf = io.BytesIO()
    Image.fromarray(k).save(buf, "JPEG", quality=95)
    assert np.abs(decode_image(buf.getvalue(), (1, 28, 28)) - expected).max() < 0.1
    exc = refused(decode_image, png(np.zeros((32, 32), np.uint8)), (1, 28, 28))
    assert exc.code == "bad_image_size" and "28×28" in exc.body()["error"]


@pytest.mark.parametrize("data", [b"", b"GIF89a....", png(np.random.default_rng(4).integers(0, 256, (28, 28), dtype=np.uint8))[:400],
                                  b"\x89PNG\r\n\x1a\n" + b"\0" * 100, b"\xff\xd8\xff" + b"junk" * 10])
def test_broken_images(data):
    assert refused(decode_image, data, (1, 28, 28)).code == "broken_image"


def test_multipart():
    k = np.random.default_rng(3).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    boundary = "xYzZy"
    body = b""
    for i in range(2):
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n").encode() + png(k[i]) + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    parts = parse_multipart(body, f"multipart/form-data; boundary={boundary}")
    images = images_from_parts(parts, SPEC)
    np.testing.assert_array_equal(images, np.divide(k, np.float32(255), dtype=np.float32)[:, None])
    assert refused(parse_multipart, body, "multipart/form-data").code == "malformed_multipart"
    assert refused(images_from_parts, [], SPEC).code == "empty_batch"


def test_outputs_are_strict_json_even_with_unfilled_slots():
    from dundi.serving.model import ModelInfo, Prediction

    info = ModelInfo("v", "r", "w" * 64, "i" * 64, "mnist-10k", "lenet5", (1, 28, 28), 10, tuple("0123456789"), 10, 3, 2, 10,
                     128, None)
    pred = Prediction(np.array([3]), np.array([False]), np.array([[3, -1]]), np.array([[-1.0, -np.inf]]),
                      np.array([[-2.0, -np.inf]]), np.array([0.5]))
    out = json.loads(dumps(v2_response(pred, info, "dundi", "id-1", None)))
    fine = next(o for o in out["outputs"] if o["name"] == "fine_scores")
    assert fine["data"] == [-2.0, None] and fine["shape"] == [1, 2] and out["id"] == "id-1"


def test_model_config_validation():
    base = ModelConfig("/runs/a")
    assert ModelConfig.from_dict({"k": 3}, base).k == 3
    for bad in ({"n": "5"}, {"m": True}, {"abstain_threshold": -1}, {"extra": 1}, {"run": ""}, []):
        with pytest.raises(RequestError) as info:
            ModelConfig.from_dict(bad, base)
        assert info.value.status == 422


# ---------------------------------------------------------------------------- the app, no Ray

@pytest.fixture(scope="module")
def local_model(mnist_runs):
    from dundi.serving.app import LocalBackend

    return LocalBackend(ModelConfig(str(mnist_runs["dundi"])))


def client(backend, **settings):
    from fastapi.testclient import TestClient

    from dundi.serving.app import create_app

    return TestClient(create_app(backend, ServeSettings.create(use_env=False, **settings)))


def test_bearer_auth_guards_inference_but_not_health(local_model):
    c = client(local_model, auth_token="s3cret")
    body = v2([0.5] * 784, [1, 28, 28])
    assert c.get("/v2/health/ready").status_code == 200
    r = c.post("/v2/models/dundi/infer", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer") and r.json()["error"]
    assert c.post("/v2/models/dundi/infer", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/v2/models/dundi").status_code == 401
    assert c.post("/v2/models/dundi/infer", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_admin_route_is_off_without_a_token(local_model):
    r = client(local_model).post("/admin/reload", json={"k": 3})
    assert r.status_code == 403 and r.json()["code"] == "admin_disabled"


def test_abstain_calibrated_on_held_out_data(local_model, mnist_runs, data_dir):
    """The distance threshold is an order statistic of held-out nearest-oracle distances, and
    the served app abstains exactly beyond it.

    Which inputs lie beyond it is a property of the trained model, not of this code: inverted
    digits, once used here as the "far" inputs, land anywhere from 0 % to 4 % beyond the 0.99
    quantile depending on how the small fixture model happened to train (thread count, what
    trained before it), so a rate asserted on them passed or failed by luck. The held-out
    images themselves are a deterministic probe: by the definition of the quantile a known
    share of them (here several) lies beyond the threshold, and exactly those must abstain."""
    from dundi.data import load_split
    from dundi.serving.abstain import calibrate_rule, held_out_images

    model = local_model.model
    images, labels, source = held_out_images(model.run, data_dir, limit=500)
    assert "validation" in source and len(images) > 100
    figures = calibrate_rule(model, images, labels, rate=0.01, fields=("abstain_threshold",))
    assert figures["abstain_rate"] <= 0.01 and figures["thresholds"]["abstain_threshold"] > 0
    thr = figures["thresholds"]["abstain_threshold"]
    # one request holds all held-out images: the served distances are then computed on the
    # same batch as calibrate's, bit for bit (batch size changes float32 rounding by ~1e-4)
    c = client(local_model, admin_token="adm", max_batch=len(images))
    r = c.post("/admin/reload", json={"abstain_threshold": thr}, headers={"Authorization": "Bearer adm"})
    assert r.status_code == 200 and r.json()["model"]["abstain_threshold"] == thr, r.text

    def served(x: np.ndarray) -> list[dict]:
        r = c.post("/classify", json=x.tolist())
        assert r.status_code == 200, r.text[:300]
        return r.json()["results"]

    held = served(images)
    test_x, _, _ = load_split("mnist-10k", "test", data_dir, limit=100)
    clean = served(test_x)
    odd = served(1.0 - test_x)  # inverted digits: answered or not, by the same rule
    for res in held + clean + odd:  # abstaining is exactly "nearest oracle beyond the threshold"
        assert res["abstained"] == (res["nearest_oracle_distance"] > thr)
        assert (res["label"] is None and res["class_name"] == "unknown") == res["abstained"]
    distances = model.run.classify(images, model.rule).nearest_distance
    beyond = distances > thr
    assert beyond.sum() >= 1  # up to 1 % of the held-out images, by the calibration's definition
    assert [res["abstained"] for res in held] == beyond.tolist()
    assert np.mean([res["abstained"] for res in held]) == pytest.approx(figures["abstain_rate"])
    assert [res["nearest_oracle_distance"] for res in held] == distances.tolist()
    assert np.mean([res["abstained"] for res in clean]) < 0.1  # the test split is in-distribution too
    r = c.post("/admin/reload", json={"abstain_threshold": None}, headers={"Authorization": "Bearer adm"})
    assert r.status_code == 200 and r.json()["model"]["abstain_threshold"] is None
    assert not any(res["abstained"] for res in served(images[beyond]))
