"""Where an attack's random numbers come from: one generator for the batch, or one stream per
sample.

An attack on its own draws from one ``torch.Generator`` seeded at each ``run`` (:class:`BatchDraws`):
the numbers a sample gets then depend on its position in the batch and on which other samples
are still being attacked, so the same image attacked in a shard of 8 and in a shard of 16 starts
from another point. An evaluation that must give the same rows in any layout (shard size,
worker count) passes a key per sample (its id in the dataset) to :meth:`Attack.run
<dundi.attacks.base.Attack.run>`; every draw is then :class:`SampleDraws`: a counter-based hash
of (seed, the sample's key, the sample's own counter), vectorised over the batch. A sample's
numbers depend on nothing but its key, the attack's seed and how many numbers it has drawn
before -- not on its neighbours, the batch size or which neighbours were already fooled.

The hash is Chris Wellons' ``lowbias32`` (a 32-bit integer permutation with low bias) in
exact int64 arithmetic (32-bit multiplications split in 16-bit halves, so nothing overflows on
any device); uniforms take its top 24 bits, exact in float32. It is a statistical generator for
attack starts and proposals, not a cryptographic one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def hash32(x: Tensor) -> Tensor:
    """lowbias32: a bijection of [0, 2^32) with low bias, elementwise on int64 tensors."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_keys(seed: int, keys: Tensor) -> Tensor:
    """One 32-bit stream key per sample from the attack's seed and the samples' own keys."""
    keys = torch.as_tensor(keys, dtype=torch.int64)
    s = hash32(torch.tensor(int(seed) & MASK32, dtype=torch.int64) ^ hash32(torch.tensor(int(seed) >> 32)))
    return hash32(hash32(keys & MASK32) ^ hash32(keys >> 32) ^ s)


class BatchDraws:
    """Every draw from one ``torch.Generator`` seeded with ``seed``: an attack used on its own
    (the numbers torchattacks draws under the same seed, where the reference tests rely on it)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.gen = torch.Generator(device=device).manual_seed(int(seed))
        self.device = torch.device(device)

    def take(self, rows: Tensor) -> "BatchDraws":
        return self

    def rand(self, shape) -> Tensor:
        return torch.rand(tuple(shape), generator=self.gen, device=self.device)

    def uniform(self, shape, low: float, high: float) -> Tensor:
        return torch.empty(tuple(shape), device=self.device).uniform_(low, high, generator=self.gen)

    def normal(self, shape) -> Tensor:
        return torch.empty(tuple(shape), device=self.device).normal_(generator=self.gen)

    def randint(self, low: int, high: int, shape) -> Tensor:
        return torch.randint(low, high, tuple(shape), generator=self.gen, device=self.device)


class SampleDraws:
    """One stream per sample (see the module docstring). ``take(rows)`` is the same streams for
    a subset of the samples (rows of this object), sharing their counters, so an attack that
    narrows its batch to the samples still robust keeps drawing each one's own numbers.
    Every draw's first axis is the samples'."""

    def __init__(self, seed: int, keys: Tensor, device: torch.device | str = "cpu",
                 _counters: Tensor | None = None, _rows: Tensor | None = None):
        self.device = torch.device(device)
        self.keys = sample_keys(seed, keys).to(self.device) if _counters is None else keys
        self.counters = torch.zeros(len(self.keys), dtype=torch.int64, device=self.device) \
            if _counters is None else _counters
        self.rows = torch.arange(len(self.keys), device=self.device) if _rows is None else _rows

    def take(self, rows: Tensor) -> "SampleDraws":
        return SampleDraws(0, self.keys, self.device, self.counters, self.rows[rows.to(self.device)])

    def _bits(self, shape) -> Tensor:
        """(len(rows), *shape[1:]) 24-bit integers, each sample's next numbers in order."""
        shape = tuple(shape)
        if shape[0] != len(self.rows):
            raise ValueError(f"a per-sample draw of shape {shape} for {len(self.rows)} samples")
        per = math.prod(shape[1:])
        start = self.counters[self.rows]
        self.counters[self.rows] = start + per
        count = (start[:, None] + torch.arange(per, device=self.device)[None, :]) & MASK32
        h = hash32(hash32(count ^ self.keys[self.rows][:, None]) ^ self.keys[self.rows][:, None])
        return (h >> 8).reshape(shape)

    def rand(self, shape) -> Tensor:
        return self._bits(shape).to(torch.float32) * 2.0 ** -24

    def uniform(self, shape, low: float, high: float) -> Tensor:
        return low + (high - low) * self.rand(shape)

    def normal(self, shape) -> Tensor:
        """Box-Muller from two uniforms per number (the first shifted off zero)."""
        u1 = (self._bits(shape).to(torch.float64) + 0.5) * 2.0 ** -24
        u2 = self.rand(shape).to(torch.float64)
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).float()

    def randint(self, low: int, high: int, shape) -> Tensor:
        span = high - low
        if not 0 < span <= 1 << 24:
            raise ValueError(f"randint over [{low}, {high}) is out of range")
        return low + (self._bits(shape) * span >> 24)


def draws_for(seed: int, keys: Tensor | None, device: torch.device | str) -> BatchDraws | SampleDraws:
    """The draws of one ``run``: per sample where the caller gave keys, else one generator."""
    return BatchDraws(seed, device) if keys is None else SampleDraws(seed, keys, device)


__all__ = ["BatchDraws", "SampleDraws", "draws_for", "hash32", "sample_keys"]
