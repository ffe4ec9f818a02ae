"""Accuracy as a count of right answers over processes: the metric the generation evaluations log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric


class MatchAccuracy(Metric):
    """The fraction of answers judged right; ``correct`` and ``total`` are summed over processes, so the accuracy
    is that of all examples together, not a mean of per-process means."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, right: Sequence[bool]) -> None:  # type: ignore[override]
        # rebinding, not +=: states reset under a Trainer's inference mode cannot be updated in place later
        self.correct = self.correct + sum(bool(r) for r in right)
        self.total = self.total + len(right)

    def compute(self) -> torch.Tensor:
        """Accuracy in [0, 1]; ``nan`` before any answer was scored."""
        return self.correct.double() / self.total

    @property
    def count(self) -> int:
        """Answers scored on this process (all processes inside :meth:`sync_context`)."""
        return int(self.total)
