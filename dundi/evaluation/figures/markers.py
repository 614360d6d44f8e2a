"""The pages and their marked blocks: find every `<!-- figures:NAME -->` block in README.md and
docs/**, render it with its registered renderer, report the blocks that differ."""

from __future__ import annotations

import re
from pathlib import Path

from dundi.errors import DundiError
from dundi.evaluation.figures.registry import renderers

BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.S)


def pages(root: Path) -> list[Path]:
    """README.md and every Markdown page under docs/ (reports written by `dundi report` hold no
    blocks and are left as they are)."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def render_text(text: str, root: Path) -> str:
    """text with every marked block rendered afresh from the raw files under root."""
    known = renderers()

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in known:
            raise DundiError(f"published figures: unknown block {name!r}; known: {', '.join(sorted(known))}")
        return match.group(1) + known[name](root) + match.group(4)
    return BLOCK.sub(fill, text)


def stale_blocks(root: Path) -> list[str]:
    """'PAGE: NAME' for each block whose text differs from what its raw files render."""
    stale = []
    for page in pages(root):
        text = page.read_text()
        rendered = render_text(text, root)
        if rendered != text:
            old = {m["name"]: m["body"] for m in BLOCK.finditer(text)}
            new = {m["name"]: m["body"] for m in BLOCK.finditer(rendered)}
            stale += [f"{page.relative_to(root)}: {name}" for name in old if old[name] != new[name]]
    return stale
