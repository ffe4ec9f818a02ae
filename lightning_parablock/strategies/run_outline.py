"""One line, when training starts, that says what a round trains and how much of the data the run reads.

Lightning's model summary counts every parameter the module leaves trainable, the whole model for a run that trains
one block per round; this line says what the federation actually trains: the blocks and their size against the
model, the clients and local steps of a round, the samples a round reads and the passes over the training data the
whole run makes (``rounds × participants × local_steps × batch × accumulation / samples``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lightning_parablock.core.run_length import passes_over_data


@dataclass(frozen=True)
class RunOutline:
    """What one round trains and how long the run is, as the strategy planned it."""

    block_parameters: list[int]  # trainable parameters of each block
    model_parameters: int
    participants: int  # clients training in each round
    clients: int
    local_steps: int
    batch_size: int
    accumulate: int
    num_samples: int  # training samples the clients' shards hold together
    rounds: Optional[int]  # None: no set end
    first_round: int = 0  # > 0 when the fit resumes

    @property
    def samples_per_round(self) -> int:
        return self.participants * self.local_steps * self.batch_size * self.accumulate

    @property
    def passes(self) -> Optional[float]:
        """Passes over the training data the whole run makes (``None`` without a set end)."""
        if self.rounds is None:
            return None
        return passes_over_data(self.rounds, self.samples_per_round, self.num_samples)

    def format(self) -> str:
        """``ParaBlock: a round trains 1 of 4 blocks (28.7 K parameters, 13.8% of the model's 208 K) on 10 of 10
        clients × 8 local steps × batch 16 = 1,280 samples. 60 rounds (one epoch is one round) read the 4,000
        training samples 19.20 times.``"""
        sizes = sorted(self.block_parameters)
        size = _count(sizes[0]) if sizes[0] == sizes[-1] else f"{_count(sizes[0])} to {_count(sizes[-1])}"
        share = sum(sizes) / len(sizes) / self.model_parameters if self.model_parameters else 0.0
        accumulation = f" × accumulation {self.accumulate}" if self.accumulate > 1 else ""
        blocks = f"{len(sizes)} block{'s' if len(sizes) > 1 else ''}"
        line = (
            f"ParaBlock: a round trains 1 of {blocks} ({size} parameters, {share:.1%} of the model's"
            f" {_count(self.model_parameters)}) on {self.participants} of {self.clients} clients × {self.local_steps}"
            f" local steps × batch {self.batch_size}{accumulation} = {self.samples_per_round:,} samples."
        )
        if self.rounds is None:
            return line + " The run has no set end (max_epochs and max_steps are unlimited)."
        resumed = f", resumed at round {self.first_round + 1}" if self.first_round else ""
        return (
            line + f" {self.rounds} rounds (one epoch is one round{resumed}) read the {self.num_samples:,} training"
            f" samples {self.passes:.2f} times."
        )


def _count(n: int) -> str:
    """``1.24 B``, ``30.4 M``, ``12.3 K``, ``512``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)
