"""Seeded random streams, one per use, independent of the global RNG state and of each other.

Every random choice of a run is a pure function of ``(seed, stream, keys...)``: a resumed run, a reference loop
and every process of a multi-process run draw the same values without sharing any state, and a new use of
randomness takes a new stream instead of shifting the draws of the others. The stream numbers are part of the
results: changing one changes every run's draws for that use.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class Stream(IntEnum):
    """What a draw is for."""

    PLACEMENT = 0x9A4C  # the rank hosting each client
    PARTICIPANTS = 0xC11E  # the clients of a round (partial participation)
    RANDOM_BLOCK = 0x5C4ED  # the block of a round, ``schedule="random"``
    BLOCK_PERMUTATION = 0xC7C1E  # the block order of a cycle, ``schedule="permutation"``
    SPACED_BLOCK = 0x5FACE  # the pick among the allowed blocks of a round, ``schedule="spaced"``
    PRETRAIN_ORDER = 0x97E7  # the example order of benchmarks/pretrain_tiny.py, per pass
    DATA_ORDER = 0xDA7A  # a client's shuffled order of its examples, per pass
    LORA_RESTART = 0xF10A  # FLoRA's fresh adapters after a merge


def seeded_generator(*keys: int) -> torch.Generator:
    """A generator keyed by several integers (seed, round, client ...), independent of global RNG state."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def stream_generator(seed: int, stream: Stream, *keys: int) -> torch.Generator:
    """The generator of ``stream`` for the run's ``seed`` and the draw's ``keys`` (round, client, pass ...)."""
    return seeded_generator(seed, int(stream), *keys)
