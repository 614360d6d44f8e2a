"""``POST /admin/classes``: enroll or remove a class of the served run's index while serving.

The change itself is :mod:`dundi.run.enrollment` on the run directory (under the run's write lock,
written as a new index version, committed atomically); the service then reloads with that
version pinned (``index_version`` in the model settings), which is the same in-place swap as
``/admin/reload``: the old index answers until the new one is loaded and verified, so no
request is dropped, and on Ray Serve every replica is reconfigured before the route answers.

Request bodies (JSON)::

    {"add": "NAME", "images": <array like POST /classify's>, "dtype": "float32" | "uint8",
     "oracles": N (optional: at most N oracles, default as many as the fullest class),
     "seed": S (optional, default 0)}
    {"remove": "NAME"}
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Awaitable, Callable

import numpy as np

from dundi.errors import DundiError
from dundi.serving.errors import RequestError, bad_request
from dundi.serving.inputs import InputSpec, parse_classify_json
from dundi.serving.model import ModelConfig

EXPECTED = ('{"add": "NAME", "images": [...], "dtype": "float32" | "uint8", "oracles": N, "seed": S} '
            'or {"remove": "NAME"}')


@dataclasses.dataclass(frozen=True)
class ClassChange:
    """One enrollment (``images`` set) or removal (``images`` None) of class ``name``."""

    name: str
    images: np.ndarray | None = None
    oracles: int | None = None
    seed: int = 0


def _int_field(obj: dict, key: str, default: int | None, low: int) -> int | None:
    value = obj.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise RequestError(422, "invalid_class_change", f"{key}={value!r} is not an integer of at least {low}",
                           EXPECTED)
    return value


def parse_class_change(obj: Any, spec: InputSpec) -> ClassChange:
    """Validate a class change request; the images as /classify validates them (4xx)."""
    if not isinstance(obj, dict) or len({"add", "remove"} & set(obj)) != 1:
        raise bad_request("invalid_class_change", 'the body names no class change (exactly one of '
                          '"add" and "remove")', EXPECTED)
    allowed = {"add", "images", "dtype", "oracles", "seed"} if "add" in obj else {"remove"}
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise bad_request("invalid_class_change", f"unknown field(s) {', '.join(map(repr, unknown))}", EXPECTED)
    name = obj.get("add", obj.get("remove"))
    if not isinstance(name, str) or not name.strip():
        raise RequestError(422, "invalid_class_change", f"class name {name!r} is not a non-empty string", EXPECTED)
    if "remove" in obj:
        return ClassChange(name)
    if "images" not in obj:
        raise RequestError(422, "no_images", f"no images to enroll class {name!r} from", EXPECTED)
    images = parse_classify_json({k: obj[k] for k in ("images", "dtype") if k in obj}, spec)
    return ClassChange(name, images, _int_field(obj, "oracles", None, 1), _int_field(obj, "seed", 0, 0))


def apply_class_change(run_dir: str, change: ClassChange, k: int) -> dict:
    """Change the run's index on disk (blocking; call in a thread). Refusals are 422 (409 for a
    name already taken or missing), nothing written."""
    from dundi.run.enrollment import add_class, remove_class

    try:
        if change.images is None:
            return remove_class(run_dir, change.name, min_classes=k)
        return add_class(run_dir, change.name, change.images, n=change.oracles, seed=change.seed)
    except DundiError as exc:
        conflict = "already in" in str(exc) or "has no class" in str(exc)
        raise RequestError(409 if conflict else 422, "class_change_refused", str(exc), EXPECTED) from None


async def change_classes(config: ModelConfig, change: ClassChange,
                         reload: Callable[[dict], Awaitable[dict]]) -> dict:
    """Apply ``change`` to the served run, then reload with the new index version pinned."""
    listing = await asyncio.to_thread(apply_class_change, config.run, change, config.k)
    reloaded = await reload({"index_version": listing["version"]})
    done = {key: listing[key] for key in ("added", "removed") if key in listing}
    return {**done, "index_version": listing["version"], "classes": listing["classes"], **reloaded}
