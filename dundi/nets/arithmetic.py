"""The float32 arithmetic a certificate assumes, and the settings that would change it.

A certified radius (docs/certification.md §5, §12) bounds what the served network computes
under IEEE float32 round-to-nearest sums of products with gradual underflow. Several
process-wide settings swap that arithmetic for another one without any error: oneDNN's
fpmath mode (bf16/tf32 kernels for float32 tensors), torch's ``fp32_precision`` switches and
``set_float32_matmul_precision``, TF32 on a GPU, a disabled oneDNN (other CPU kernels, some
of them Winograd, which are not sums of products), and flush-to-zero/denormals-are-zero.
This module is the one place that reads them: :func:`arithmetic_deviations` lists each one
that is set, and :func:`check_arithmetic` refuses a certified run (one line naming the
setting and how to unset it) or warns for an uncertified one.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from dundi.errors import DundiError

FPMATH_VARIABLES = ("ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE")
STRICT_FPMATH = ("", "strict")        # oneDNN's default: float32 computed as float32
IEEE_PRECISION = ("none", "ieee")     # torch fp32_precision values that keep float32


class ArithmeticWarning(UserWarning):
    """An uncertified run serves under a setting that changes its float32 arithmetic."""


def _fp32_precision_switches(device: str) -> list[tuple[str, object]]:
    """(name, module) of every torch ``fp32_precision`` switch that applies on ``device``."""
    b = torch.backends
    names = [("torch.backends", b), ("torch.backends.mkldnn", b.mkldnn),
             ("torch.backends.mkldnn.conv", getattr(b.mkldnn, "conv", None)),
             ("torch.backends.mkldnn.matmul", getattr(b.mkldnn, "matmul", None))]
    if device == "cuda":
        names += [("torch.backends.cuda.matmul", b.cuda.matmul), ("torch.backends.cudnn", b.cudnn),
                  ("torch.backends.cudnn.conv", getattr(b.cudnn, "conv", None))]
    return [(n, m) for n, m in names if m is not None and hasattr(m, "fp32_precision")]


def _flushes_denormals() -> bool:
    """True when this thread flushes subnormal float32 results (or inputs) to zero, in torch
    or in numpy (torch.set_flush_denormal, or a library built with -ffast-math)."""
    tiny = 2.0 ** -140
    return bool((torch.tensor([tiny]) * 1.0).item() == 0.0 or
                (np.array([tiny], np.float32) * np.float32(1.0))[0] == 0.0)


def arithmetic_deviations(device: str = "cpu") -> list[str]:
    """One line per setting that changes the float32 arithmetic on ``device`` ("cpu" or
    "cuda"), each naming the setting and how to unset it; empty when none is set."""
    out = []
    for var in FPMATH_VARIABLES:
        value = os.environ.get(var)
        if value is not None and value.strip().lower() not in STRICT_FPMATH:
            out.append(f"{var}={value} lets oneDNN compute float32 in lower precision: "
                       f"unset it (or set it to STRICT) before starting the process")
    for name, module in _fp32_precision_switches(device):
        value = module.fp32_precision
        if value not in IEEE_PRECISION:
            out.append(f"{name}.fp32_precision={value!r} computes float32 in {value}: "
                       f"set {name}.fp32_precision = 'ieee'")
    try:
        matmul = torch.get_float32_matmul_precision()
    except RuntimeError:  # the new fp32_precision API is in use: its switches are read above
        matmul = "highest"
    if matmul != "highest":
        out.append(f"torch.set_float32_matmul_precision({matmul!r}) allows reduced-precision "
                   f"float32 products: call torch.set_float32_matmul_precision('highest')")
    if device == "cpu" and not torch.backends.mkldnn.enabled:
        out.append("torch.backends.mkldnn.enabled=False moves convolutions to other kernels "
                   "(Winograd, not sums of products): set torch.backends.mkldnn.enabled = True")
    if device == "cuda":
        if torch.backends.cuda.matmul.allow_tf32:
            out.append("torch.backends.cuda.matmul.allow_tf32=True computes float32 products in "
                       "TF32: set torch.backends.cuda.matmul.allow_tf32 = False")
        if torch.backends.cudnn.allow_tf32:
            out.append("torch.backends.cudnn.allow_tf32=True computes float32 convolutions in "
                       "TF32: set torch.backends.cudnn.allow_tf32 = False")
    if _flushes_denormals():
        out.append("flush-to-zero is on (subnormal floats become 0): call "
                   "torch.set_flush_denormal(False), and do not load libraries built with -ffast-math")
    return out


def check_arithmetic(certified: bool, device: str = "cpu") -> list[str]:
    """Before a run answers: a certified run refuses (DundiError, one line naming the first
    setting and how to unset it) where any setting changes its arithmetic, since its
    certificates would not hold; an uncertified run gets an :class:`ArithmeticWarning` per
    setting and serves. Returns the deviations found."""
    found = arithmetic_deviations(device)
    if found and certified:
        raise DundiError(f"this certified run refuses to answer: {found[0]}"
                         + (f" (and {len(found) - 1} more setting(s))" if len(found) > 1 else ""))
    for line in found:
        warnings.warn(f"answers are computed under another arithmetic: {line}", ArithmeticWarning,
                      stacklevel=2)
    return found


__all__ = ["ArithmeticWarning", "arithmetic_deviations", "check_arithmetic"]
