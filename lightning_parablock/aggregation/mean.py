"""The paper's rule: the weighted mean Σ_i w_i Δ^i, optionally with each client's block delta clipped first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Optional, get_args

from torch import Tensor

from lightning_parablock.aggregation.aggregator import Aggregator, Weighting
from lightning_parablock.aggregation.nonfinite import NonFinitePolicy
from lightning_parablock.aggregation.rules import Deltas, add_weighted, clip_scale, weighted_sum
from lightning_parablock.argument_checks import check_choice, check_positive


class MeanAggregator(Aggregator, method="mean"):
    """Δ_t = Σ_i w_i Δ^i with the weights normalized over the kept clients (FedAvg; the paper).

    A sum, so ranks add their own clients into a partial sum and meet in one all-reduce
    (:attr:`reduces_from_partial_sums`); within a process clients are added in ascending id.

    Args:
        weighting: each client's weight: ``"uniform"`` (the paper) or its sample count (``"samples"``).
        clip_norm: scale each client's block delta to at most this L2 norm before adding it.
        nonfinite: see :class:`~lightning_parablock.aggregation.aggregator.Aggregator`.
    """

    reduces_from_partial_sums: ClassVar[bool] = True
    reads_payloads_as_sent: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "accumulate" in vars(cls) and "reads_payloads_as_sent" not in vars(cls):
            cls.reads_payloads_as_sent = False  # arithmetic of its own gets decoded fp32 deltas, as it always did

    def __init__(
        self, weighting: Weighting = "uniform", clip_norm: Optional[float] = None, nonfinite: NonFinitePolicy = "raise"
    ) -> None:
        super().__init__(nonfinite=nonfinite)
        self.weighting = check_choice("weighting", weighting, get_args(Weighting))
        self.clip_norm = None if clip_norm is None else check_positive("clip_norm", clip_norm)

    def combine(self, deltas: Deltas, weights: Mapping[int, float]) -> dict[str, Tensor]:
        return weighted_sum(deltas, self._clipped(deltas, weights))

    def accumulate(self, total: Mapping[str, Tensor], deltas: Deltas, weights: Mapping[int, float]) -> dict[int, str]:
        return add_weighted(total, deltas, self._clipped(deltas, weights))

    def sum_into(self, total: Mapping[str, Tensor], deltas: Deltas, weights: Mapping[int, float]) -> dict[int, str]:
        """The first client's term is written over whatever ``total`` held, the others added: no zeroing pass."""
        if type(self).accumulate is not MeanAggregator.accumulate:  # a subclass's own sum
            return super().sum_into(total, deltas, weights)
        return add_weighted(total, deltas, self._clipped(deltas, weights), overwrite=True)

    def _clipped(self, deltas: Deltas, weights: Mapping[int, float]) -> dict[int, float]:
        """Each client's weight times its clipping factor: clipping folds into the sum, no scaled copy of a delta."""
        if self.clip_norm is None:
            return {client: weights[client] for client in deltas}
        return {client: weights[client] * clip_scale(delta, self.clip_norm) for client, delta in deltas.items()}

    def settings(self) -> dict[str, Any]:
        return {"weighting": self.weighting, "clip_norm": self.clip_norm, **super().settings()}
