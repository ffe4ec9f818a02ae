"""Server aggregation: Δ_t from the round's client deltas, in fp32.

The paper aggregates with the weighted mean Σ_i w_i Δ^i_t. For cross-silo runs where a
client may send garbage, :class:`Aggregator` adds per-client norm clipping, the
coordinate-wise median and the trimmed mean, and a policy for non-finite deltas.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Optional, get_args

from torch import Tensor

from lightning_parablock.aggregation.nonfinite import NonFinitePolicy, kept_clients, non_finite_clients
from lightning_parablock.aggregation.rules import (
    Deltas,
    check_deltas,
    clip_by_norm,
    coordinate_median,
    trimmed_mean,
    weighted_sum,
)
from lightning_parablock.argument_checks import check_choice, check_float, check_positive

AggregationMethod = Literal["mean", "median", "trimmed_mean"]


@dataclass
class AggregateResult:
    aggregate: dict[str, Tensor]
    skipped_clients: list[int]  # non-finite deltas left out under the "skip" policy


class Aggregator:
    """How the server combines a round's deltas.

    Args:
        method: ``"mean"`` (weighted by the strategy's weights; the paper), ``"median"``
            (coordinate-wise) or ``"trimmed_mean"``; the robust two ignore the weights.
        clip_norm: clip each client's block delta to this L2 norm before combining.
        trim_fraction: share of clients dropped at each end by ``"trimmed_mean"``, in [0, 0.5).
        nonfinite: a client whose delta holds NaN/Inf makes the exchange fail (``"raise"``) or is
            left out of this round with a warning (``"skip"``); it never reaches the global model.
    """

    def __init__(
        self,
        method: AggregationMethod = "mean",
        clip_norm: Optional[float] = None,
        trim_fraction: float = 0.1,
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        self.method = check_choice("method", method, get_args(AggregationMethod))
        self.clip_norm = None if clip_norm is None else check_positive("clip_norm", clip_norm)
        self.trim_fraction = check_float("trim_fraction", trim_fraction, minimum=0.0, maximum=0.5, max_open=True)
        self.nonfinite = check_choice("nonfinite", nonfinite, get_args(NonFinitePolicy))

    def __call__(self, deltas: Deltas, weights: Mapping[int, float]) -> AggregateResult:
        check_deltas(deltas)
        bad = non_finite_clients(deltas)
        kept = {client: deltas[client] for client in kept_clients(list(deltas), bad, self.nonfinite)}
        if self.clip_norm is not None:
            kept = {client: clip_by_norm(delta, self.clip_norm) for client, delta in kept.items()}
        if self.method == "median":
            aggregate = coordinate_median(kept)
        elif self.method == "trimmed_mean":
            aggregate = trimmed_mean(kept, self.trim_fraction)
        else:
            total = sum(weights[client] for client in kept)
            aggregate = weighted_sum(kept, {client: weights[client] / total for client in kept})
        return AggregateResult(aggregate, sorted(bad))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, clip_norm={self.clip_norm},"
            f" trim_fraction={self.trim_fraction}, nonfinite={self.nonfinite!r})"
        )
