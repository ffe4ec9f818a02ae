"""How long a federated run is, in rounds, local steps and passes over the training data.

One epoch is one round. A Trainer ends the run after ``max_epochs`` rounds or ``max_steps`` optimizer steps of one
process, whichever comes first; a process steps once per local step of each of its turns (idle turns included),
so how many rounds ``max_steps`` allows depends on how many turns each round has. One round reads
``participants × local_steps × batch_size × accumulation`` training samples.
"""

from __future__ import annotations

import math
from typing import Callable, Optional


def rounds_in_run(
    max_epochs: Optional[int], max_steps: Optional[int], steps_in_round: Callable[[int], int]
) -> Optional[int]:
    """Rounds a Trainer with these limits trains (a round cut short by ``max_steps`` counts); ``None`` when neither
    limit ends the run (``-1`` or ``None`` for both).

    Args:
        max_epochs: the Trainer's ``max_epochs`` (rounds).
        max_steps: the Trainer's ``max_steps`` (optimizer steps of one process).
        steps_in_round: optimizer steps one process takes in a round, by round index.
    """
    cap = max_epochs if max_epochs is not None and max_epochs >= 0 else None
    if max_steps is None or max_steps < 0:
        return cap
    rounds, steps = 0, 0
    while steps < max_steps and (cap is None or rounds < cap):
        steps += steps_in_round(rounds)
        rounds += 1
    return rounds


def rounds_for_passes(passes: float, num_samples: int, samples_per_round: int) -> int:
    """The fewest rounds that read ``num_samples`` training samples at least ``passes`` times (at least one)."""
    if samples_per_round < 1 or num_samples < 1:
        raise ValueError(f"No round reads any sample: {samples_per_round} per round over {num_samples} samples.")
    needed = passes * num_samples / samples_per_round
    return max(1, math.ceil(needed - 1e-9))  # 2.0000000001 rounds from float rounding are 2


def passes_over_data(rounds: int, samples_per_round: int, num_samples: int) -> float:
    """How many times ``rounds`` rounds read the training data over (each client reads its own shard)."""
    return rounds * samples_per_round / num_samples if num_samples else 0.0
