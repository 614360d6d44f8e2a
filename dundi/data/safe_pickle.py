"""A restricted unpickler for CIFAR-10 python batches.

Why not ``pickle.load``: unpickling calls whatever global the file names (``os.system``,
``builtins.eval`` ...), so a tampered batch file downloaded from a mirror could run code.
The project rule is that nothing is unpickled with the stock loader.

Why not "refuse every global": real CIFAR batches hold their pixels as a numpy array,
and a pickled array names three globals (``numpy.core.multiarray._reconstruct``,
``numpy.ndarray``, ``numpy.dtype``). ``SafeUnpickler.find_class`` therefore refuses every
global except those three (and ``_codecs.encode``, which Python 3 uses for ``bytes`` in
protocol-2 pickles), and even for those it never returns the real numpy object: it returns
inert local stand-ins that only *record* their arguments. ``to_array`` then checks the
recorded shape/dtype/bytes and builds the array with ``np.frombuffer``. So no function
named by the file is ever called; only dicts, lists, tuples, bytes, str, ints, floats,
bools, None and these records can come out of ``safe_loads``.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np


class ArrayRecord:
    """Stand-in for ``numpy.core.multiarray._reconstruct(...)``: keeps the BUILD state."""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class DtypeRecord:
    """Stand-in for ``numpy.dtype(...)``: keeps the type string, e.g. ``b'u1'``."""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _NdarrayMarker:
    """Stand-in for the ``numpy.ndarray`` class argument of ``_reconstruct``."""


_NDARRAY = _NdarrayMarker()


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: only the str->latin1 bytes case pickles produce."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing _codecs.encode other than str -> latin1 bytes")
    return text.encode("latin1")


_STANDINS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): ArrayRecord,
    ("numpy._core.multiarray", "_reconstruct"): ArrayRecord,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): DtypeRecord,
    ("_codecs", "encode"): _latin1_encode,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves no real global; see the module docstring for why."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _STANDINS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: CIFAR batches only contain "
                "dicts, lists, bytes, ints and uint8 arrays"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent id in pickle")


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` without executing anything (py2 strings come back as bytes)."""
    return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()


def _as_str(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def to_array(record: Any) -> np.ndarray:
    """Turn an ``ArrayRecord`` of a C-ordered uint8 array into a numpy array, checking it."""
    if not isinstance(record, ArrayRecord) or record.state is None:
        raise ValueError(f"expected a pickled numpy array, got {type(record).__name__}")
    state = record.state
    if not (isinstance(state, tuple) and len(state) == 5):
        raise ValueError("pickled numpy array has an unexpected state layout")
    _version, shape, dtype, fortran, raw = state
    if not isinstance(dtype, DtypeRecord) or _as_str(dtype.args[0] if dtype.args else "") != "u1":
        raise ValueError("pickled numpy array is not uint8 ('u1')")
    if fortran:
        raise ValueError("pickled numpy array is Fortran-ordered; expected C order")
    if isinstance(raw, str):  # py2 str loaded with a non-bytes encoding
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError("pickled numpy array has no raw byte buffer")
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"pickled numpy array has an invalid shape {shape!r}")
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(f"pickled array shape {shape} needs {expected} bytes, found {len(raw)}")
    return np.frombuffer(bytes(raw), dtype=np.uint8).reshape(shape)
