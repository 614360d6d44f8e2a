"""Shifted inputs for judging the abstain rule: the MNIST-C corruptions, far-OOD and near-OOD sets.

The corruptions are those of Mu & Gilmer, "MNIST-C: A Robustness Benchmark for Computer
Vision" (2019), the 15 kinds of the published benchmark, each at the severity the published
dataset was made with. They are generated here with numpy and scipy from any (N, 1, 28, 28)
float32 images in [0, 1] (the test split), seeded, so the benchmark needs no download. The
published code leans on scikit-image, OpenCV and ImageMagick; where a primitive differs
(ImageMagick's motion blur, scikit-image's Canny) it is re-implemented from its definition
and the difference is said in the function's docstring.

Far-OOD sets are inputs that are no digit at all (another dataset, noise, blank, constant and
inverted images); near-OOD sets are glyphs of another kind (letters and symbols drawn with
PIL's built-in font, shaped like digits: ink strokes on black). None of these sets may ever be
used to calibrate the rule: calibration sees held-out clean digits only.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

SIDE = 28
CENTRE = (SIDE - 1) / 2  # 13.5: the published transforms keep this point fixed

# The published severities (MNIST-C's corruptions.py defaults: the dataset's settings).
SHOT_PHOTONS = 3              # shot noise, severity 5: Poisson(x * 3) / 3
IMPULSE_AMOUNT = 0.17         # impulse noise, severity 4: 17 % of pixels salt or pepper
GLASS = (0.7, 1, 2)           # glass blur, severity 1: sigma, max shuffle distance, passes
MOTION = (10, 3.0, 45.0)      # motion blur, severity 1: radius, sigma, max |angle| (degrees)
SHEAR = 0.4                   # shear, severity 2 (radians of shear, random sign)
SCALE = 0.7                   # scale, severity 3: the digit shrinks to 70 %
ROTATE = 0.4                  # rotate, severity 2 (radians, random sign)
BRIGHTNESS = 0.5              # brightness, severity 5: +0.5 to the HSV value (grey: to x)
TRANSLATE = 3                 # translate, severity 3: 3 pixels on each axis, random signs
FOG = (3.0, 1.4)              # fog, severity 5: fractal weight, wibble decay
SPATTER = (0.65, 0.3, 1.0, 0.65, 1.5)  # spatter, severity 4: mean, std, sigma, cut, mask sigma
MUD = 63 / 255                # spatter's mud colour
STRIPE_COLUMNS = 7            # stripe: the 7 leftmost and rightmost columns inverted


def _each(images: np.ndarray, fn: Callable[[np.ndarray, np.random.Generator], np.ndarray],
          seed: int) -> np.ndarray:
    """Apply ``fn(image (28, 28) float64, rng)`` to every image, one seeded generator for all,
    so a set is the same on every machine; float32 (N, 1, 28, 28) in [0, 1] back."""
    rng = np.random.default_rng(seed)
    out = np.empty(images.shape, np.float32)
    for i, img in enumerate(images):
        out[i, 0] = np.clip(fn(np.asarray(img[0], np.float64), rng), 0.0, 1.0)
    return out


def _affine(img: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Warp by the 2x2 map ``forward`` (in (x, y) = (column, row) coordinates) about the image
    centre, bilinear, zeros outside. As in the published code, the output at p reads the input
    at ``forward`` p (the map is scikit-image's inverse map)."""
    m = np.asarray(forward, np.float64)
    rc = m[::-1, ::-1]  # the same map in (row, column) coordinates
    offset = np.array([CENTRE, CENTRE]) - rc @ np.array([CENTRE, CENTRE])
    return ndimage.affine_transform(img, rc, offset=offset, order=1, mode="constant", cval=0.0)


def _sign(rng: np.random.Generator) -> float:
    return float(rng.choice([-1.0, 1.0]))


def shot_noise(img, rng):
    """Photon noise: each pixel a Poisson count of x * 3 photons, over 3."""
    return rng.poisson(img * SHOT_PHOTONS) / SHOT_PHOTONS


def impulse_noise(img, rng):
    """Salt and pepper: 17 % of the pixels (drawn without replacement), half set to 1, half to 0."""
    flat = img.copy().ravel()
    hit = rng.choice(flat.size, int(round(IMPULSE_AMOUNT * flat.size)), replace=False)
    salt = rng.random(len(hit)) < 0.5
    flat[hit[salt]], flat[hit[~salt]] = 1.0, 0.0
    return flat.reshape(img.shape)


def glass_blur(img, rng):
    """Blur, swap pixels with a neighbour at most 1 away (randomly, bottom-right first, twice),
    quantised to 8 bits in between as published, and blur again."""
    sigma, delta, passes = GLASS
    x = np.floor(ndimage.gaussian_filter(img, sigma, mode="nearest") * 255) / 255
    for _ in range(passes):
        for h in range(SIDE - delta, delta, -1):
            for w in range(SIDE - delta, delta, -1):
                if rng.random() < 0.5:
                    dx, dy = rng.integers(-delta, delta, size=2)
                    h2, w2 = h + dy, w + dx
                    x[h, w], x[h2, w2] = x[h2, w2], x[h, w]
    return ndimage.gaussian_filter(x, sigma, mode="nearest")


def motion_blur(img, rng):
    """Motion blur along a random angle in [-45, 45] degrees: a one-sided Gaussian-weighted
    average (radius 10, sigma 3) of the image shifted backwards along the direction of motion,
    ImageMagick's MotionBlurImage kernel sampled bilinearly (ImageMagick samples the nearest
    pixel: the edges here are slightly softer)."""
    radius, sigma, max_angle = MOTION
    angle = np.deg2rad(rng.uniform(-max_angle, max_angle))
    steps = np.arange(radius + 1, dtype=np.float64)
    weights = np.exp(-steps ** 2 / (2 * sigma ** 2))
    weights /= weights.sum()
    out = np.zeros_like(img)
    for s, w in zip(steps, weights):
        out += w * ndimage.shift(img, (s * np.sin(angle), s * np.cos(angle)), order=1, mode="nearest")
    return out


def shear(img, rng):
    """Shear by 0.4 radians (random sign) about the centre (scikit-image's affine shear)."""
    c = SHEAR * _sign(rng)
    return _affine(img, np.array([[1.0, -np.sin(c)], [0.0, np.cos(c)]]))


def scale(img, rng):
    """Shrink the digit to 70 % about the centre."""
    return _affine(img, np.eye(2) / SCALE)


def rotate(img, rng):
    """Rotate by 0.4 radians (random sign) about the centre."""
    c = ROTATE * _sign(rng)
    return _affine(img, np.array([[np.cos(c), -np.sin(c)], [np.sin(c), np.cos(c)]]))


def brightness(img, rng):
    """+0.5 to the HSV value: for a grey image, to every pixel, clipped at 1."""
    return img + BRIGHTNESS


def translate(img, rng):
    """Shift by 3 pixels on each axis, random signs, zeros coming in."""
    dy, dx = TRANSLATE * _sign(rng), TRANSLATE * _sign(rng)
    return ndimage.shift(img, (dy, dx), order=0, mode="constant", cval=0.0)


def stripe(img, rng):
    """The 7 leftmost and 7 rightmost columns inverted."""
    x = img.copy()
    x[:, :STRIPE_COLUMNS] = 1 - x[:, :STRIPE_COLUMNS]
    x[:, SIDE - STRIPE_COLUMNS:] = 1 - x[:, SIDE - STRIPE_COLUMNS:]
    return x


def plasma(rng: np.random.Generator, size: int = 256, decay: float = FOG[1]) -> np.ndarray:
    """A diamond-square fractal height map in [0, 1] (size a power of two), the fog layer."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def wibbled(a):
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        grid[half:size:step, half:size:step] = wibbled(square)
        centres = grid[half:size:step, half:size:step]
        corners = grid[0:size:step, 0:size:step]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[0:size:step, half:size:step] = wibbled(left)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half:size:step, 0:size:step] = wibbled(top)
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def fog(img, rng):
    """Add 3 x a fractal cloud and rescale so the image's brightest value stays what it was."""
    weight = FOG[0]
    top = img.max()
    return (img + weight * plasma(rng)[:SIDE, :SIDE]) * top / (top + weight)


def spatter(img, rng):
    """Mud drops: a blurred random layer cut at 0.65, its blurred mask where >= 0.8 painted
    in the mud colour over the image."""
    mean, std, sigma, cut, mask_sigma = SPATTER
    liquid = ndimage.gaussian_filter(rng.normal(mean, std, img.shape), sigma, mode="nearest")
    mask = ndimage.gaussian_filter((liquid > cut).astype(np.float64), mask_sigma, mode="nearest")
    mask[mask < 0.8] = 0
    return img * (1 - mask) + MUD * mask


def _line(c0: float, r0: float, c1: float, r1: float) -> np.ndarray:
    """The published line stroke from (column c0, row r0) to (c1, r1): intensity
    log(1 - d / 2.3) + 1 at vertical distance d from the line, clipped to [0, 1], only between
    the columns floor(c0) and ceil(c1)."""
    if c1 == c0:
        return np.zeros((SIDE, SIDE))
    cols, rows = np.meshgrid(np.arange(SIDE, dtype=np.float64), np.arange(SIDE, dtype=np.float64))
    slope = (r1 - r0) / (c1 - c0)
    d = np.clip(np.abs(rows - (slope * (cols - c0) + r0)), 0, 2.3 - 1e-10)
    stroke = np.clip(np.log(1 - d / 2.3) + 1, 0, 1)
    stroke[:, :int(np.floor(c0))] = 0
    stroke[:, int(np.ceil(c1)):] = 0
    return stroke


def dotted_line(img, rng):
    """A line across the image between random rows, every other pair of columns left out."""
    r0, r1 = rng.integers(0, 27, size=2)
    stroke = _line(0, r0, 27, r1)
    for start in range(0, SIDE, 4):
        stroke[:, start:start + 2] = 0
    return img + stroke


def zigzag(img, rng):
    """A zigzag (teeth 2 long, 2 high) from column 2 to 25 along a random, slightly sloped line."""
    a = b = 2.0
    c0, c1 = 2, 25
    r0 = int(rng.integers(0, 27))
    r1 = r0 + int(rng.integers(-5, 5))
    theta = np.arctan((r1 - r0) / (c1 - c0))
    length = (c1 - c0) / np.cos(theta)
    points = [(0.0, 0.0)]
    r_i = 0.0
    for i in range(int((length - a) // (2 * a)) + 1):
        r_i = (-1) ** i * b
        points.append(((2 * i + 1) * a, r_i))
    last = (2 * a) * (length // (2 * a))
    if length != last:
        points.append((length, r_i / (2 * (length - last))))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    cs, rs = rot @ np.array(points).T
    cs, rs = cs + c0, rs + r0
    x = img.copy()
    for i in range(1, len(cs)):
        x = np.clip(x + _line(cs[i - 1], rs[i - 1], cs[i], rs[i]), 0, 1)
    return x


def canny(img: np.ndarray, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> np.ndarray:
    """Canny's edge map (scikit-image's defaults: Gaussian sigma 1, hysteresis thresholds 0.1
    and 0.2 of the Sobel magnitude): smoothing, Sobel gradients, non-maximum suppression
    across the gradient (4 directions), then edges connected to a strong one. scikit-image
    interpolates the suppression between directions; this rounds to the nearest, so a few
    edge pixels differ."""
    smooth = ndimage.gaussian_filter(img, sigma, mode="constant")
    gy, gx = ndimage.sobel(smooth, axis=0), ndimage.sobel(smooth, axis=1)
    mag = np.hypot(gx, gy)  # scipy's unscaled Sobel, as scikit-image's canny uses it
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180) % 180
    pad = np.pad(mag, 1)
    offsets = {0: (0, 1), 45: (1, 1), 90: (1, 0), 135: (1, -1)}
    direction = (np.round(angle / 45).astype(int) % 4) * 45
    keep = np.zeros_like(mag, bool)
    for d, (dr, dc) in offsets.items():
        ahead = pad[1 + dr:1 + dr + SIDE, 1 + dc:1 + dc + SIDE]
        behind = pad[1 - dr:1 - dr + SIDE, 1 - dc:1 - dc + SIDE]
        keep |= (direction == d) & (mag >= ahead) & (mag >= behind)
    keep[0, :] = keep[-1, :] = keep[:, 0] = keep[:, -1] = False
    weak = keep & (mag >= low)
    regions, count = ndimage.label(weak, structure=np.ones((3, 3)))
    strong = np.unique(regions[weak & (mag >= high)])
    return np.isin(regions, strong[strong > 0]).astype(np.float64)


def canny_edges(img, rng):
    """The digit's Canny edge map (1 on an edge, 0 elsewhere)."""
    return canny(img)


CORRUPTIONS: dict[str, Callable] = {
    "shot_noise": shot_noise, "impulse_noise": impulse_noise, "glass_blur": glass_blur,
    "motion_blur": motion_blur, "shear": shear, "scale": scale, "rotate": rotate,
    "brightness": brightness, "translate": translate, "stripe": stripe, "fog": fog,
    "spatter": spatter, "dotted_line": dotted_line, "zigzag": zigzag, "canny_edges": canny_edges}

# Designed on these (the rule's signals and their combination were chosen looking at them);
# the others are reported without having been looked at while designing.
DESIGN_CORRUPTIONS = ("shot_noise", "motion_blur", "rotate", "brightness", "fog", "zigzag")


def corrupt(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """``images`` (N, 1, 28, 28) float32 in [0, 1] under one MNIST-C corruption, seeded."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; one of {', '.join(CORRUPTIONS)}")
    if images.ndim != 4 or images.shape[1:] != (1, SIDE, SIDE):
        raise ValueError(f"MNIST-C corruptions take (N, 1, 28, 28) images, got {images.shape}")
    return _each(images, CORRUPTIONS[kind], seed)


def scan_variations(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The two shifts of the issue that found the old rule wanting, beside MNIST-C: digits at
    70 % contrast (x * 0.7) and with Gaussian pixel noise of sd 0.1 (clipped), seeded."""
    rng = np.random.default_rng(seed)
    noisy = np.clip(images + rng.normal(0, 0.1, images.shape), 0, 1)
    return {"contrast 70%": (images * 0.7).astype(np.float32), "gaussian noise 0.1": noisy.astype(np.float32)}


# --- out-of-distribution sets ------------------------------------------------------------

def glyphs(count: int, seed: int = 0) -> np.ndarray:
    """Near-OOD: letters and symbols that are no digit (none of 0-9, nor the letters most like
    them: O, o, I, l, S, Z, B, G, q, g), drawn white on black with PIL's built-in font at a
    random size, stroke width and offset, then scaled into the 20x20 box at the centre of a
    28x28 image like MNIST's digits. (N, 1, 28, 28) float32."""
    from PIL import Image, ImageDraw, ImageFont

    letters = [c for c in "ACDEFHJKLMNPRTUVWXYacdefhkmnprtuvwxy#%&@*+?!" if c not in "OoIlSZBGqg"]
    rng = np.random.default_rng(seed)
    out = np.zeros((count, 1, SIDE, SIDE), np.float32)
    for i in range(count):
        size = int(rng.integers(28, 44))
        font = ImageFont.load_default(size=size)
        canvas = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(canvas).text((32, 32), str(rng.choice(letters)), fill=255, font=font,
                                    anchor="mm", stroke_width=int(rng.integers(1, 4)), stroke_fill=255)
        box = canvas.getbbox()
        glyph = canvas.crop(box)
        w, h = glyph.size
        factor = 20 / max(w, h)
        glyph = glyph.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR)
        tile = Image.new("L", (SIDE, SIDE), 0)
        left = (SIDE - glyph.size[0]) // 2 + int(rng.integers(-1, 2))
        top = (SIDE - glyph.size[1]) // 2 + int(rng.integers(-1, 2))
        tile.paste(glyph, (left, top))
        out[i, 0] = np.asarray(tile, np.float32) / 255
    return out


def far_ood(digits: np.ndarray, seed: int = 0, fashion: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Far-OOD sets as many as ``digits`` (N, 1, 28, 28): uniform noise, Gaussian noise
    (mean 0.5, sd 0.25, clipped), blank (all 0) and white (all 1) images, constant grey images
    (each one value uniform in [0, 1]), the digits inverted, and ``fashion`` (Fashion-MNIST
    images) where given."""
    rng = np.random.default_rng(seed)
    shape = digits.shape
    sets = {"uniform noise": rng.random(shape, dtype=np.float32),
            "gaussian noise": np.clip(rng.normal(0.5, 0.25, shape), 0, 1).astype(np.float32),
            "blank": np.zeros(shape, np.float32),
            "white": np.ones(shape, np.float32),
            "constant grey": np.broadcast_to(rng.random((shape[0], 1, 1, 1), dtype=np.float32),
                                             shape).copy(),
            "inverted digits": (1.0 - digits).astype(np.float32)}
    if fashion is not None:
        sets["fashion-mnist"] = np.asarray(fashion[:shape[0]], np.float32)
    return sets


__all__ = ["CORRUPTIONS", "DESIGN_CORRUPTIONS", "corrupt", "scan_variations", "canny", "plasma", "glyphs", "far_ood"]
