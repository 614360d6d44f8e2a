"""One image contract for every way in: the Python API (``validate_images``), image files
(``dundi classify``) and the HTTP service decode the same pixels to the same values and refuse
the same inputs for the same reason (the service's 422 code is the contract's rule)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dundi.errors import DundiError
from dundi.data.pixels import validate_images
from dundi.run.image_files import read_images
from dundi.serving import RequestError
from dundi.serving.inputs import InputSpec, decode_image, parse_classify_json

GRAY, RGB = (1, 8, 8), (3, 8, 8)
rng = np.random.default_rng(0)


def _saved(tmp_path, arr: np.ndarray, name: str, **kw) -> tuple[str, bytes]:
    path = tmp_path / name
    Image.fromarray(arr, **kw).save(path)
    return str(path), path.read_bytes()


@pytest.mark.parametrize("shape", [GRAY, RGB])
@pytest.mark.parametrize("kind", ["8-bit gray", "16-bit gray", "RGB", "RGBA"])
def test_files_and_uploads_decode_to_the_same_pixels(tmp_path, shape, kind):
    arr = {"8-bit gray": rng.integers(0, 256, (8, 8), dtype=np.uint8),
           "16-bit gray": rng.integers(0, 65536, (8, 8), dtype=np.uint16),
           "RGB": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
           "RGBA": rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)}[kind]
    path, data = _saved(tmp_path, arr, "x.png")
    from_file, _ = read_images([path], shape)
    from_upload = decode_image(data, shape)
    np.testing.assert_array_equal(from_file[0], from_upload)
    assert from_upload.shape == shape and from_upload.dtype == np.float32
    if kind == "16-bit gray":  # precision kept and, for an RGB model, the gray repeated
        np.testing.assert_allclose(from_upload, np.broadcast_to(arr / 65535.0, shape), atol=1e-6)


ARRAYS = {
    "float ok": np.full((2, 1, 8, 8), 0.5, np.float32),
    "one image (H, W)": np.full((8, 8), 0.25, np.float32),
    "above one": np.full((2, 1, 8, 8), 3.0, np.float32),
    "negative": np.full((1, 8, 8), -0.5, np.float32),
    "nan": np.full((1, 8, 8), np.nan, np.float32),
    "wrong shape": np.zeros((2, 3, 8, 8), np.float32),
    "flat": np.zeros(64, np.float32),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_the_api_and_the_service_accept_and_refuse_alike(name):
    arr = ARRAYS[name]
    try:
        api, api_code = validate_images(arr, GRAY), None
    except DundiError as exc:
        api, api_code = None, getattr(exc, "code", "not a pixel rule")
    try:
        http, http_code = parse_classify_json(arr.tolist(), InputSpec(GRAY, max_batch=8)), None
    except RequestError as exc:
        http, http_code = None, exc.code
    assert api_code == http_code, (api_code, http_code)
    if api is not None:
        np.testing.assert_array_equal(api, http)
        assert api.shape[1:] == GRAY and api.dtype == np.float32


def test_eight_bit_pixels_become_k_over_255_on_both_paths():
    raw = np.arange(64, dtype=np.uint8).reshape(1, 8, 8) * 4
    api = validate_images(raw, GRAY)
    http = parse_classify_json({"images": raw.tolist(), "dtype": "uint8"}, InputSpec(GRAY, max_batch=8))
    np.testing.assert_array_equal(api, http)
    np.testing.assert_array_equal(api, np.divide(raw[None], np.float32(255.0), dtype=np.float32))


def test_json_integers_are_float_pixels_to_the_service():
    """JSON has one number type: an FP32 request written as 0 and 1 is pixels, not integers."""
    arr = (np.arange(64).reshape(1, 8, 8) % 2).tolist()
    got = parse_classify_json(arr, InputSpec(GRAY, max_batch=8))
    np.testing.assert_array_equal(got, np.asarray(arr, np.float32)[None])
    with pytest.raises(RequestError) as info:
        parse_classify_json((np.full((1, 8, 8), 2)).tolist(), InputSpec(GRAY, max_batch=8))
    assert info.value.code == "out_of_range"
