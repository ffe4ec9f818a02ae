"""Coordinate-wise trimmed mean: drop the largest and smallest values of each coordinate, average the rest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.aggregation.nonfinite import NonFinitePolicy
from lightning_parablock.aggregation.rules import Deltas, clip_by_norm, trimmed_mean
from lightning_parablock.argument_checks import check_float, check_positive


class TrimmedMeanAggregator(Aggregator, method="trimmed_mean"):
    """Δ_t is the coordinate-wise mean after dropping the ``trim_fraction`` largest and smallest values; unweighted.

    Needs every delta: with several processes they are gathered before it runs.

    Args:
        trim_fraction: share of clients dropped at each end, in [0, 0.5).
        clip_norm: scale each client's block delta to at most this L2 norm first.
        nonfinite: see :class:`~lightning_parablock.aggregation.aggregator.Aggregator`.
    """

    def __init__(
        self, trim_fraction: float = 0.1, clip_norm: Optional[float] = None, nonfinite: NonFinitePolicy = "raise"
    ) -> None:
        super().__init__(nonfinite=nonfinite)
        self.trim_fraction = check_float("trim_fraction", trim_fraction, minimum=0.0, maximum=0.5, max_open=True)
        self.clip_norm = None if clip_norm is None else check_positive("clip_norm", clip_norm)

    def combine(self, deltas: Deltas, weights: Mapping[int, float]) -> dict[str, Tensor]:
        if self.clip_norm is not None:
            deltas = {client: clip_by_norm(delta, self.clip_norm) for client, delta in deltas.items()}
        return trimmed_mean(deltas, self.trim_fraction)

    def settings(self) -> dict[str, Any]:
        return {"trim_fraction": self.trim_fraction, "clip_norm": self.clip_norm, **super().settings()}
