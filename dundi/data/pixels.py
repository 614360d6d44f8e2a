"""The image contract, written once: what an image batch may look like and how pixels become
the float32 (N, C, H, W) values in [0, 1] every model takes.

The Python API (``Run.classify``, enrollment), image files on disk (``dundi classify``) and the
HTTP service all accept and refuse the same inputs because they all call these functions; each
caller only words the refusal for its audience (a :class:`DundiError` line, or a 422 whose code
is :attr:`PixelError.code`).

The Python API's check is :func:`validate_images`.

* Layouts for a model taking (C, H, W): a batch (N, C, H, W) or one image (C, H, W); for a
  single-channel model also (N, H, W) and (H, W).
* Float pixels must be finite and within [0, 1]. Values above 1 are refused, not rescaled: 0..255
  pixels sent by mistake would otherwise get confident answers about a white image.
* 8-bit pixels (integers 0..255) become ``k / 255`` in float32, exactly as the dataset cache
  converts them.
* Decoded PNG/JPEG images take the model's channels: grayscale "L" for C = 1, "RGB" for C = 3,
  alpha dropped; 16-bit grayscale keeps its precision (``k / 65535``) and is repeated over the
  channels of an RGB model.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

from dundi.errors import DundiError

_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "c": "complex numbers"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class PixelError(DundiError):
    """An input that breaks the image contract. ``code`` names the rule it breaks (the service
    answers it as its 422 code), ``problem`` says what was found and ``expected`` what is
    accepted instead."""

    def __init__(self, code: str, problem: str, expected: str):
        super().__init__(f"{problem}; expected {expected}")
        self.code, self.problem, self.expected = code, problem, expected


def layouts(in_shape: Sequence[int]) -> str:
    """The accepted array shapes for a model taking ``in_shape`` = (C, H, W), in words."""
    c, h, w = (int(v) for v in in_shape)
    if c == 1:
        return f"a batch (N, 1, {h}, {w}) or (N, {h}, {w}), or one image (1, {h}, {w}) or ({h}, {w})"
    return f"a batch (N, {c}, {h}, {w}) or one image ({c}, {h}, {w})"


def as_batch(arr: np.ndarray, in_shape: Sequence[int], what: str = "the images") -> np.ndarray:
    """``arr`` in an accepted layout, viewed as (N, C, H, W); :class:`PixelError` otherwise."""
    c, h, w = (int(v) for v in in_shape)
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) == 4 and shape[1:] == (c, h, w):
        return arr
    if shape == (c, h, w):
        return arr[None]
    if c == 1 and len(shape) == 3 and shape[1:] == (h, w):
        return arr[:, None]
    if c == 1 and shape == (h, w):
        return arr[None, None]
    raise PixelError("bad_shape", f"{what} has shape {shape}", layouts((c, h, w)))


def kind_name(dtype: np.dtype) -> str:
    """What a non-float array holds, in words (for refusals)."""
    return _KIND_NAMES.get(dtype.kind, "non-numeric values")


def from_8bit(arr: np.ndarray, what: str = "the images") -> np.ndarray:
    """8-bit pixels (integer values 0..255, in any numeric dtype) as float32 ``k / 255``."""
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise PixelError("non_finite", f"{what} holds NaN or Inf", "integers in 0..255 (8-bit pixels)")
        if (arr != np.rint(arr)).any():
            raise PixelError("bad_dtype", f"{what} holds fractional values but is declared 8-bit",
                             "integers in 0..255, or float pixels in [0, 1] declared as such")
    elif arr.dtype.kind not in "iu":
        raise PixelError("bad_dtype", f"{what} holds {kind_name(arr.dtype)}", "integers in 0..255 (8-bit pixels)")
    lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
    if lo < 0 or hi > 255:
        raise PixelError("out_of_range", f"{what} has values in [{lo}, {hi}]", "8-bit pixels in 0..255")
    return np.divide(arr.astype(np.uint8), np.float32(255.0), dtype=np.float32)


def from_float(arr: np.ndarray, what: str = "the images", eight_bit_advice: str = "") -> np.ndarray:
    """Float pixels checked finite and within [0, 1], as contiguous float32. ``eight_bit_advice``
    tells the caller's user how to send 0..255 pixels instead, when values above 1 are found."""
    if arr.dtype.kind != "f":
        raise PixelError("bad_dtype", f"{what} holds {kind_name(arr.dtype)} (dtype {arr.dtype})",
                         "float pixels in [0, 1], or 8-bit pixels 0..255 declared as such")
    values = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        raise PixelError("non_finite", f"{what} holds {int((~finite).sum())} NaN or Inf value(s)",
                         "finite float pixels in [0, 1]")
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            hint = (f" ({eight_bit_advice})" if eight_bit_advice and hi > 1.0 else
                    " (undo any normalisation, e.g. mean/std, first)" if lo < 0.0 else "")
            raise PixelError("out_of_range", f"{what} has pixel values in [{lo:g}, {hi:g}]",
                             f"float pixels in [0, 1]{hint}")
    return values


def validate_images(images: Any, in_shape: tuple[int, ...]) -> np.ndarray:
    """Check images for a model taking ``in_shape`` = (C, H, W) and return them as a
    (N, C, H, W) float32 batch in [0, 1], or raise one :class:`DundiError` naming the problem.

    The rules are this module's, the HTTP service's too, so the Python API and the service
    accept and refuse the same inputs. Here the array's dtype says what the pixels
    are: uint8 arrays are 8-bit pixels, float arrays are pixels in [0, 1], anything else is
    refused. An empty batch of the right shape is returned empty.
    """
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported: never import it here
    if torch is not None and isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    try:
        arr = np.asarray(images)
    except (ValueError, TypeError):
        raise DundiError("the images are a ragged sequence (rows of different lengths): pass a numpy "
                         "array of float pixels in [0, 1]") from None
    batch = as_batch(arr, in_shape, "the images")
    if arr.dtype == np.uint8:
        return from_8bit(batch, "the images")
    return from_float(batch, "the images", "8-bit pixels: divide by 255, or pass a uint8 array")


def decoded_pixels(img, channels: int) -> np.ndarray:
    """A decoded Pillow image as (C, H, W) float32 in [0, 1] for a model with ``channels``."""
    if channels not in (1, 3):
        raise PixelError("bad_shape", f"a model with {channels} input channels cannot take image files",
                         "a model with 1 (grayscale) or 3 (RGB) channels")
    if img.mode in _SIXTEEN_BIT_MODES:  # 16-bit grayscale PNG: keep its precision
        gray = np.clip(np.asarray(img, dtype=np.float64) / 65535.0, 0.0, 1.0).astype(np.float32)
        return np.repeat(gray[None], channels, axis=0)
    if channels == 1:
        arr = np.asarray(img.convert("L"), dtype=np.uint8)[None]
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    return np.divide(arr, np.float32(255.0), dtype=np.float32)
