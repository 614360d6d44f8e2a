"""Turning request bodies into a validated image batch, or a 4xx saying what is wrong.

The image contract itself (layouts, float and 8-bit pixels, decoded PNG/JPEG) is
dundi/data/pixels.py, shared with the Python API and ``dundi classify``: this module reads the
protocols (Open Inference v2 JSON, /classify JSON, raw and multipart PNG/JPEG uploads) and turns
a broken rule into a 4xx whose code names it. Service-only rules: 8-bit pixels are declared (v2
``UINT8``, ``{"dtype": "uint8"}`` on /classify; PNG/JPEG are 8-bit or 16-bit by nature), a
request holds at least one image and at most ``max_batch``, and images are never resized: an
image whose size differs from (H, W) is refused with the size expected, checked before any
pixel is decoded.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import numpy as np

from dundi.data import pixels
from dundi.data.pixels import PixelError
from dundi.serving.errors import RequestError, bad_request, invalid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
IMAGE_TYPES = ("image/png", "image/jpeg")
FLOAT_DTYPES = ("FP32", "FP64")
V2_DTYPES = ("FP32", "FP64", "UINT8")
V2_INPUT_NAME = "images"
EIGHT_BIT_ADVICE = '8-bit pixels: send UINT8, or {"dtype": "uint8"} on /classify'


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a request must look like for the model being served."""

    in_shape: tuple[int, int, int]  # (C, H, W)
    max_batch: int

    def layouts(self) -> str:
        return pixels.layouts(self.in_shape)


# ---------------------------------------------------------------------------- basic parsing

def media_type(content_type: str | None) -> str:
    """``"application/json; charset=utf-8"`` → ``"application/json"``; missing → ``""``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json_type(mtype: str) -> bool:
    return mtype == "application/json" or mtype.endswith("+json")


def parse_json(body: bytes) -> Any:
    """Parse a JSON body. ``NaN``/``Infinity`` literals parse (so they can be refused with a
    clear message later); anything else that is not JSON is a 400."""
    if not body.strip():
        raise bad_request("malformed_json", "the request body is empty", "a JSON document")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad_request("malformed_json", f"the body is not valid JSON ({exc})", "a JSON document") from None


def _as_array(data: Any, what: str) -> np.ndarray:
    """A JSON (nested) list as a numeric numpy array, refusing ragged or non-numeric data."""
    if not isinstance(data, list):
        raise bad_request("invalid_request", f"{what} is a JSON {type(data).__name__}",
                          "a (nested) JSON array of numbers")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise invalid("ragged_array", f"{what} is a ragged array (rows of different lengths)",
                      "a rectangular (nested) array of numbers") from None
    if arr.dtype.kind == "b":
        raise invalid("bad_dtype", f"{what} holds booleans", "numbers (pixels)")
    if arr.dtype.kind not in "fiu":
        if arr.dtype.kind == "O" and arr.size and all(isinstance(v, int) for v in arr.ravel()):
            raise invalid("out_of_range", f"{what} holds integers too large to be pixels",
                          "float pixels in [0, 1] or 8-bit integers in 0..255")
        raise invalid("bad_dtype", f"{what} holds non-numeric values (strings, nulls or objects)",
                      "a (nested) array of numbers")
    return arr


def _refused(exc: PixelError) -> RequestError:
    """The contract's refusal as the service's 422."""
    return invalid(exc.code, exc.problem, exc.expected)


def pixels_to_float(arr: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """Validate pixel values for a declared dtype and return float32 pixels in [0, 1]."""
    try:
        if dtype == "UINT8":
            return pixels.from_8bit(arr, what)
        if arr.dtype.kind in "iu":  # JSON numbers: 0 and 1 written without a point are floats too
            arr = arr.astype(np.float64)
        return pixels.from_float(arr, what, EIGHT_BIT_ADVICE)
    except PixelError as exc:
        raise _refused(exc) from None


def to_batch(arr: np.ndarray, spec: InputSpec, what: str = "the input") -> np.ndarray:
    """Reshape an accepted layout to (N, C, H, W), checking emptiness and the batch limit."""
    if arr.size == 0:
        raise invalid("empty_batch", f"{what} holds no image", f"at least one image: {spec.layouts()}")
    try:
        batch = pixels.as_batch(arr, spec.in_shape, what)
    except PixelError as exc:
        raise _refused(exc) from None
    check_batch_size(len(batch), spec, what)
    return batch


def check_batch_size(count: int, spec: InputSpec, what: str) -> None:
    if count == 0:
        raise invalid("empty_batch", f"{what} holds no image", f"at least one image: {spec.layouts()}")
    if count > spec.max_batch:
        raise RequestError(413, "batch_too_large", f"{what} holds {count} images",
                           f"at most {spec.max_batch} images per request (split the batch)")


# ---------------------------------------------------------------------------- v2 protocol

@dataclasses.dataclass
class V2Request:
    images: np.ndarray           # (N, C, H, W) float32 in [0, 1]
    id: str | None
    outputs: list[str] | None    # requested output names, None for all


def parse_v2_infer(obj: Any, spec: InputSpec, output_names: tuple[str, ...]) -> V2Request:
    """Validate an Open Inference Protocol (v2) JSON inference request."""
    c, h, w = spec.in_shape
    expected = (f'{{"inputs": [{{"name": "{V2_INPUT_NAME}", "shape": [N, {c}, {h}, {w}], '
                f'"datatype": "FP32", "data": [...]}}]}} with FP32 pixels in [0, 1] (or UINT8 0..255)')
    if not isinstance(obj, dict):
        raise bad_request("invalid_request", f"the request is a JSON {type(obj).__name__}", expected)
    unknown = sorted(set(obj) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise bad_request("invalid_request", f"unknown field(s) {', '.join(map(repr, unknown))}", expected)
    req_id = obj.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise bad_request("invalid_request", "\"id\" must be a string", expected)
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad_request("invalid_request", '"inputs" must be a list holding exactly one tensor', expected)
    tensor = inputs[0]
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in tensor]
    if missing:
        params = tensor.get("parameters")
        if "data" in missing and isinstance(params, dict) and "binary_data_size" in params:
            raise RequestError(415, "unsupported_extension", "the binary tensor data extension is not supported",
                               "tensor data inline as JSON numbers")
        raise bad_request("invalid_request", f"the input tensor lacks {', '.join(missing)}", expected)
    if tensor["name"] != V2_INPUT_NAME:
        raise bad_request("unknown_input", f"unknown input {tensor['name']!r}",
                          f'one input named "{V2_INPUT_NAME}"')
    shape = tensor["shape"]
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise bad_request("invalid_request", f'"shape" {shape!r} is not a list of non-negative integers', expected)
    dtype = tensor["datatype"]
    if dtype not in V2_DTYPES:
        raise invalid("bad_dtype", f"datatype {dtype!r} is not accepted",
                      f"one of {', '.join(V2_DTYPES)} (FP32/FP64 pixels in [0, 1], UINT8 pixels 0..255)")
    arr = _as_array(tensor["data"], '"data"')
    count = math.prod(shape)
    if arr.size != count:
        raise invalid("bad_shape", f'"data" holds {arr.size} values but "shape" {shape} needs {count}',
                      'as many values as the product of "shape", row-major')
    arr = arr.reshape(shape)
    batch = to_batch(arr, spec, f"input {V2_INPUT_NAME!r}")
    images = pixels_to_float(batch, dtype, f"input {V2_INPUT_NAME!r}")
    outputs = obj.get("outputs")
    names = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise bad_request("invalid_request", '"outputs" must be a list of {"name": ...} objects',
                              f"output names among {', '.join(output_names)}")
        names = [o["name"] for o in outputs]
        unknown = [n for n in names if n not in output_names]
        if unknown:
            raise bad_request("unknown_output", f"unknown output(s) {', '.join(map(repr, unknown))}",
                              f"output names among {', '.join(output_names)}")
    return V2Request(images, req_id, names)


# ---------------------------------------------------------------------------- /classify JSON

def parse_classify_json(obj: Any, spec: InputSpec) -> np.ndarray:
    """A bare (nested) array of float pixels in [0, 1], or
    ``{"images": <array>, "dtype": "float32" | "uint8"}``."""
    dtype = "float32"
    if isinstance(obj, dict):
        unknown = sorted(set(obj) - {"images", "dtype"})
        if unknown or "images" not in obj:
            raise bad_request("invalid_request",
                              f"unknown field(s) {', '.join(map(repr, unknown))}" if unknown else 'no "images" field',
                              'a JSON array of images, or {"images": [...], "dtype": "float32" | "uint8"}')
        dtype = obj.get("dtype", "float32")
        if dtype not in ("float32", "uint8"):
            raise invalid("bad_dtype", f"dtype {dtype!r} is not accepted",
                          '"float32" (pixels in [0, 1]) or "uint8" (pixels 0..255)')
        obj = obj["images"]
    arr = _as_array(obj, "the images")
    batch = to_batch(arr, spec, "the images")
    return pixels_to_float(batch, "UINT8" if dtype == "uint8" else "FP32", "the images")


# ---------------------------------------------------------------------------- images

def decode_image(data: bytes, in_shape: tuple[int, int, int], what: str = "the image") -> np.ndarray:
    """PNG or JPEG bytes → (C, H, W) float32 in [0, 1], without resizing."""
    from PIL import Image

    c, h, w = in_shape
    if not data:
        raise bad_request("broken_image", f"{what} is empty", "PNG or JPEG bytes")
    if not (data.startswith(PNG_SIGNATURE) or data.startswith(JPEG_SIGNATURE)):
        raise bad_request("broken_image", f"{what} is neither PNG nor JPEG (unrecognised signature)",
                          "PNG or JPEG bytes")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as img:
            if img.size != (w, h):  # checked before any pixel is decoded
                raise invalid("bad_image_size", f"{what} is {img.size[0]}×{img.size[1]} pixels (W×H)",
                              f"{w}×{h} pixels ({'grayscale' if c == 1 else 'RGB'}); images are not resized")
            img.load()
            return pixels.decoded_pixels(img, c)
    except RequestError:
        raise
    except PixelError as exc:
        raise _refused(exc) from None
    except Exception as exc:  # Pillow raises many types on broken data; all mean "broken image"
        reason = "unrecognised or corrupt data" if type(exc).__name__ == "UnidentifiedImageError" else str(exc)
        raise bad_request("broken_image", f"{what} cannot be decoded ({reason})",
                          "a complete PNG or JPEG file") from None


@dataclasses.dataclass
class Part:
    name: str | None
    filename: str | None
    content_type: str
    data: bytes


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """Split a multipart/form-data body into its parts (stdlib parser, no extra dependency)."""
    expected = 'multipart/form-data with one file part per image (e.g. curl -F "file=@digit.png")'
    if "boundary=" not in content_type.lower():
        raise bad_request("malformed_multipart", "the multipart content type has no boundary", expected)
    try:
        header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
        msg = BytesParser(policy=HTTP).parsebytes(header + body)
    except Exception as exc:
        raise bad_request("malformed_multipart", f"the multipart body cannot be parsed ({exc})", expected) from None
    if not msg.is_multipart() or any("Boundary" in type(d).__name__ for d in msg.defects):
        raise bad_request("malformed_multipart", "the multipart body is malformed (boundary not found)", expected)
    parts = []
    for part in msg.iter_parts():
        payload = part.get_payload(decode=True)
        parts.append(Part(part.get_param("name", header="content-disposition"), part.get_filename(),
                          part.get_content_type(), payload if isinstance(payload, bytes) else b""))
    return parts


def images_from_parts(parts: list[Part], spec: InputSpec) -> np.ndarray:
    """Each file part (a part with a filename or an image content type) is one image."""
    files = [p for p in parts if p.filename is not None or p.content_type.startswith("image/")]
    check_batch_size(len(files), spec, "the upload")
    for p in files:
        if p.content_type not in (*IMAGE_TYPES, "application/octet-stream", "image/jpg"):
            raise RequestError(415, "unsupported_media_type",
                               f"file {p.filename or p.name!r} is {p.content_type}", "image/png or image/jpeg")
    return np.stack([decode_image(p.data, spec.in_shape, f"file {p.filename or p.name!r}") for p in files])
