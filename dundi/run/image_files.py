"""Reading a user's own image files (PNG, JPEG) into the batch a run takes.

A user points DunDi at files, folders and globs; the answers must come back in an order they
can predict and match to their files, so every argument expands in sorted order (folders
recursively, by relative path) and a file named twice is read once. Images become float32
(N, C, H, W) pixels in [0, 1] — the convention of every other module — converted exactly as
the dataset cache converts 8-bit pixels (``k / 255``).

Sizes are never changed silently: a 32x32 image given to a 28x28 run is refused with the
file's name and the expected size, unless the caller asks for ``resize=True`` (a resized
image is a different input, and the user should know they asked for it). Colour images given
to a single-channel run are converted to grayscale (ITU-R 601-2 luma, Pillow's ``L`` mode);
grayscale images given to a three-channel run are repeated over the channels. Transparency
is dropped (the colour channels are read as stored). The pixel rules are dundi/data/pixels.py's,
shared with the HTTP service.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dundi.data import pixels
from dundi.errors import DundiError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GLOB_CHARS = set("*?[")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _folder_files(folder: Path) -> list[Path]:
    """Every PNG/JPEG under ``folder``, sorted by path relative to it (stable across runs)."""
    files = sorted((p for p in folder.rglob("*") if _is_image(p)),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise DundiError(f"{folder} holds no PNG or JPEG files (looked for "
                         f"{', '.join(IMAGE_SUFFIXES)}, in subfolders too)")
    return files


def _glob_files(pattern: str) -> list[Path]:
    """Files matching a glob pattern (``**`` recurses); folders it matches are expanded."""
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files: list[Path] = []
    for match in map(Path, matches):
        if match.is_dir():
            files.extend(p for p in sorted(match.rglob("*")) if _is_image(p))
        elif _is_image(match):
            files.append(match)
    if not files:
        raise DundiError(f"no PNG or JPEG file matches {pattern!r}: check the pattern "
                         f"(quote it so the shell does not expand it first)")
    return files


def expand_paths(patterns: Iterable[str]) -> list[Path]:
    """Files, folders and glob patterns -> the image files they name, in argument order, each
    argument's files sorted; a file reached twice is kept at its first place."""
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        path = Path(os.path.expanduser(pattern))
        if path.is_dir():
            files = _folder_files(path)
        elif path.is_file():
            files = [path]
        elif _GLOB_CHARS & set(pattern):
            files = _glob_files(pattern)
        else:
            raise DundiError(f"{pattern}: no such file or folder")
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    if not out:
        raise DundiError("no image files given: name PNG or JPEG files, folders or glob patterns")
    return out


def read_image(path: Path, in_shape: Sequence[int], resize: bool = False) -> np.ndarray:
    """One file as (C, H, W) float32 in [0, 1] for a run taking ``in_shape`` = (C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = (int(v) for v in in_shape)
    try:
        with Image.open(path) as img:
            img.load()
            if img.size != (w, h):
                if not resize:
                    raise DundiError(f"{path} is {img.width}x{img.height} pixels; this run takes "
                                     f"{w}x{h} images: resize them, or pass --resize to scale "
                                     f"them to {w}x{h}")
                img = img.resize((w, h), Image.Resampling.LANCZOS)
            return pixels.decoded_pixels(img, c)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DundiError(f"{path} cannot be read as a PNG or JPEG image ({reason}): "
                         f"remove it or replace it with a readable image") from None


def read_images(patterns: Iterable[str], in_shape: Sequence[int], resize: bool = False
                ) -> tuple[np.ndarray, list[str]]:
    """Read files, folders and globs into a (N, C, H, W) float32 batch in [0, 1] for a run
    taking ``in_shape``, with the file names in the same order. Raises one
    :class:`DundiError` naming the first file that is unreadable or of the wrong size."""
    files = expand_paths(patterns)
    c, h, w = (int(v) for v in in_shape)
    batch = np.empty((len(files), c, h, w), np.float32)
    for i, path in enumerate(files):
        batch[i] = read_image(path, (c, h, w), resize)
    return batch, [str(p) for p in files]
