"""Coordinate-wise median: robust to fewer than half the clients sending garbage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.aggregation.nonfinite import NonFinitePolicy
from lightning_parablock.aggregation.rules import Deltas, clip_by_norm, coordinate_median
from lightning_parablock.argument_checks import check_positive


class MedianAggregator(Aggregator, method="median"):
    """Δ_t is the coordinate-wise median of the kept deltas (the lower one for an even count); unweighted.

    Needs every delta: with several processes they are gathered before it runs.

    Args:
        clip_norm: scale each client's block delta to at most this L2 norm first.
        nonfinite: see :class:`~lightning_parablock.aggregation.aggregator.Aggregator`.
    """

    def __init__(self, clip_norm: Optional[float] = None, nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(nonfinite=nonfinite)
        self.clip_norm = None if clip_norm is None else check_positive("clip_norm", clip_norm)

    def combine(self, deltas: Deltas, weights: Mapping[int, float]) -> dict[str, Tensor]:
        if self.clip_norm is not None:
            deltas = {client: clip_by_norm(delta, self.clip_norm) for client, delta in deltas.items()}
        return coordinate_median(deltas)

    def settings(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, **super().settings()}
