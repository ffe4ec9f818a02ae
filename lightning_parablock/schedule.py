"""Which block a round trains.

Every schedule is a pure function of ``(seed, round)`` so that a resumed run, a
reference loop and every process of a multi-process run agree without sharing
any random state.
"""

from __future__ import annotations

from typing import Literal

import torch

ScheduleKind = Literal["random", "sequential", "reverse"]
SCHEDULE_KINDS: tuple[str, ...] = ("random", "sequential", "reverse")


def seeded_generator(*keys: int) -> torch.Generator:
    """A generator keyed by several integers (seed, round, client ...), independent of global RNG state."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class BlockSchedule:
    """Maps a round to a block index.

    ``random`` (the paper's default) draws a block uniformly each round; ``sequential``
    walks the blocks from the first layer up; ``reverse`` from the last layer down.
    """

    def __init__(self, kind: ScheduleKind, num_blocks: int, seed: int = 0) -> None:
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"Block schedule must be one of {SCHEDULE_KINDS}, got {kind!r}.")
        if num_blocks < 1:
            raise ValueError(f"A block schedule needs at least one block, got {num_blocks}.")
        self.kind = kind
        self.num_blocks = num_blocks
        self.seed = seed

    def block_for_round(self, round_index: int) -> int:
        if round_index < 0:
            raise ValueError(f"Rounds count from 0, got {round_index}.")
        if self.kind == "sequential":
            return round_index % self.num_blocks
        if self.kind == "reverse":
            return self.num_blocks - 1 - round_index % self.num_blocks
        generator = seeded_generator(self.seed, 0x5C4ED, round_index)
        return int(torch.randint(self.num_blocks, (1,), generator=generator))
