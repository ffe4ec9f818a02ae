"""FLoRA's server: stacking LoRA adapters so that the aggregate is exactly the weighted sum of B_i A_i."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

import torch
from torch import Tensor

from lightning_parablock.aggregation.aggregator import Aggregator, Weighting
from lightning_parablock.aggregation.nonfinite import NonFinitePolicy
from lightning_parablock.aggregation.rules import Deltas, check_deltas
from lightning_parablock.argument_checks import check_choice
from lightning_parablock.core.lora import LORA_A_WEIGHT, LORA_B_WEIGHT


def _rank_dim(name: str) -> int:
    """The LoRA rank's dimension, sized by each client's rank: A is (r_i, in), B (out, r_i)."""
    return 0 if name.endswith(LORA_A_WEIGHT) else 1


class StackingAggregator(Aggregator):
    """The server of FLoRA: per adapted layer, ``[w_i ΔB_i]`` side by side and ``[ΔA_i]`` one under another.

    The aggregate keeps the adapters' names with stacked shapes: ``lora_B`` is
    ``(out, Σ r_i)`` and ``lora_A`` is ``(Σ r_i, in)``, clients in ascending id; clients may send
    different ranks r_i. Non-finite deltas raise, or with ``nonfinite="skip"`` their clients are
    left out of the stack. A stack is no sum: with several processes every delta is gathered first.

    Args:
        weighting: the weight w_i of each client's product: ``"uniform"`` or its sample count (``"samples"``).
        nonfinite: see :class:`~lightning_parablock.aggregation.aggregator.Aggregator`.
    """

    def __init__(self, weighting: Weighting = "uniform", nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(nonfinite=nonfinite)
        self.weighting = check_choice("weighting", weighting, get_args(Weighting))

    def check(self, deltas: Deltas) -> list[str]:
        names = check_deltas(deltas, free_dim=_rank_dim)
        not_lora = [n for n in names if not n.endswith((LORA_A_WEIGHT, LORA_B_WEIGHT))]
        if not_lora:
            raise ValueError(f"FLoRA stacks LoRA adapters only; the block also holds {not_lora[:3]}.")
        return names

    def combine(self, deltas: Deltas, weights: Mapping[int, float]) -> dict[str, Tensor]:
        clients = sorted(deltas)
        aggregate: dict[str, Tensor] = {}
        for name in deltas[clients[0]]:
            if name.endswith(LORA_B_WEIGHT):
                aggregate[name] = torch.cat([deltas[c][name].float() * weights[c] for c in clients], dim=1)
            else:
                aggregate[name] = torch.cat([deltas[c][name].float() for c in clients], dim=0)
        return aggregate

    def settings(self) -> dict[str, Any]:
        return {"weighting": self.weighting, **super().settings()}
