"""Seeded randomness of the world: every generator is a function of (seed, stream name)."""

from __future__ import annotations

import zlib

import numpy as np


def as_rng(seed_or_rng: int | np.random.Generator | None, stream: str = "") -> np.random.Generator:
    """A Generator from a seed (mixed with a stable hash of ``stream``) or the Generator itself."""
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng([int(seed_or_rng or 0), zlib.crc32(stream.encode())])
