"""Which renderer fills which block. Each page module (page_*.py in this package) registers its
blocks with @block("NAME"); renderers() imports every page module once, so a new results page
adds a module and edits nothing here."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable

from dundi.errors import DundiError

Renderer = Callable[[Path], str]
_RENDERERS: dict[str, Renderer] = {}
PAGE_PREFIX = "page_"


def block(name: str) -> Callable[[Renderer], Renderer]:
    """Register fn(root) -> Markdown as the renderer of `<!-- figures:NAME -->`; a name taken
    twice is an error, so two pages cannot silently fight over one block."""
    def register(fn: Renderer) -> Renderer:
        if name in _RENDERERS and _RENDERERS[name] is not fn:
            raise DundiError(f"published figures: block {name!r} is registered twice")
        _RENDERERS[name] = fn
        return fn
    return register


def renderers() -> dict[str, Renderer]:
    """Every block's renderer, after importing each page module of this package."""
    package = __name__.rsplit(".", 1)[0]
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name.startswith(PAGE_PREFIX):
            importlib.import_module(f"{package}.{module.name}")
    return _RENDERERS
