"""Seeded random streams, one per use, independent of the global RNG state."""

from __future__ import annotations

import torch


def seeded_generator(*keys: int) -> torch.Generator:
    """A generator keyed by several integers (seed, round, client ...), independent of global RNG state."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)
