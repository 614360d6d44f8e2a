"""The shape guard's signal: how far an image lies from the subspace its run's training digits
span, with contrast and stroke noise taken out first.

A garment, a letter or a texture on a black page passes the blank, background and mean-pixel
guards, and the embedding places it near some class's oracles as confidently as a digit
(docs/results/abstain: the model's own signals withhold 0-19 % of Fashion-MNIST at 1 % of
held-out digits). What tells it from a digit is its shape: a digit is a stroke that a few
dozen principal components of training digits reconstruct well; a shirt or a shoe is a filled
blob they do not. The image is smoothed (a Gaussian of SHAPE_BLUR pixels, so pixel noise
averages away) and divided by its brightest pixel (so a faint scan is the same shape as a dark
one), then projected on the SHAPE_COMPONENTS leading principal components of training digits
treated alike; the signal is the residual's norm over the image's norm. It is a linear
autoencoder's reconstruction error -- the oldest novelty score there is -- on pixels only.

The basis is fitted on the training part of the run's train split (never its held-out part,
never the test split) and stored beside the run as plain arrays (:func:`save_basis`, read
with ``allow_pickle=False``). Every value is computed row by row in one fixed order, so
whether an image is withheld never depends on its batch. Served outside the certified radius
(dundi.rule.abstain_signals): a normalisation by the brightest pixel has no useful bound
over an L∞ ball.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

SHAPE_COMPONENTS = 40      # principal components of training digits kept
SHAPE_BLUR = 1.0           # Gaussian sigma, in pixels, before the projection
SHAPE_FIT_SIZE = 3000      # training images the basis is fitted on (a seeded choice)
SHAPE_FILE = "shape_basis.npz"


@dataclasses.dataclass(frozen=True)
class ShapeBasis:
    """The digit subspace: the mean of the prepared training images and an orthonormal basis
    (rows) of its leading principal directions, with the blur they were prepared with."""

    mean: np.ndarray      # (P,) float64
    basis: np.ndarray     # (K, P) float64, orthonormal rows
    blur: float
    shape: tuple[int, int]


def _kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(4.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def smooth(images: np.ndarray, sigma: float) -> np.ndarray:
    """(B, H, W) float64: a separable Gaussian blur with zero padding (a digit's page is black),
    summed tap by tap in one fixed order: elementwise, so a row's value is the same in any batch."""
    x = np.asarray(images, np.float64)
    if sigma <= 0:
        return x
    k = _kernel(sigma)
    r = len(k) // 2
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        padded = np.pad(x, pad)
        out = np.zeros_like(x)
        size = x.shape[axis]
        for j, w in enumerate(k):
            out += w * (padded[:, j:j + size, :] if axis == 1 else padded[:, :, j:j + size])
        x = out
    return x


def prepare(images: np.ndarray, blur: float) -> np.ndarray:
    """(B, P) each image smoothed and divided by its brightest pixel (a black image stays 0).
    Not centred: centring each image on its centre of mass (tried) let Fashion-MNIST's training
    images fit the subspace too (97 % withheld alone at 1 % of held-out digits → 76 %)."""
    x = np.asarray(images, np.float64)
    b, side = len(x), x.shape[-2:]
    x = smooth(x.reshape(-1, *side), blur).reshape(b, -1)   # each channel of each image
    top = x.max(1, keepdims=True) if x.size else np.zeros((b, 1))
    return x / np.where(top > 0, top, 1.0)


def fit_basis(images: np.ndarray, components: int = SHAPE_COMPONENTS, blur: float = SHAPE_BLUR) -> ShapeBasis:
    """The principal subspace of training ``images`` (N, 1, H, W), prepared as :func:`prepare`."""
    x = prepare(images, blur)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return ShapeBasis(mean, vt[:components].copy(), float(blur), tuple(np.asarray(images).shape[-2:]))


def shape_distance(basis: ShapeBasis, images: np.ndarray) -> np.ndarray:
    """(B,) the norm of what the subspace leaves unexplained over the prepared image's norm,
    larger = less like a digit; row by row (a matrix-vector product per image)."""
    x = prepare(images, basis.blur)
    out = np.empty(len(x))
    for i, row in enumerate(x):
        z = row - basis.mean
        residual = z - basis.basis.T @ (basis.basis @ z)
        out[i] = np.sqrt(residual @ residual) / max(float(np.sqrt(row @ row)), 1e-12)
    return out


def save_basis(path: str | os.PathLike, basis: ShapeBasis) -> None:
    """Write the basis as plain arrays, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, mean=basis.mean, basis=basis.basis, blur=np.array(basis.blur), shape=np.array(basis.shape))
    os.replace(tmp, path)


def load_basis(path: str | os.PathLike) -> ShapeBasis:
    """Read a basis written by :func:`save_basis` (no pickles)."""
    with np.load(path, allow_pickle=False) as f:
        return ShapeBasis(f["mean"].astype(np.float64), f["basis"].astype(np.float64), float(f["blur"]),
                          tuple(int(v) for v in f["shape"]))


__all__ = ["SHAPE_COMPONENTS", "SHAPE_BLUR", "SHAPE_FIT_SIZE", "SHAPE_FILE", "ShapeBasis", "smooth", "prepare",
           "fit_basis", "shape_distance", "save_basis", "load_basis"]
