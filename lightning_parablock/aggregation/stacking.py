"""FLoRA's server: stacking LoRA adapters so that the aggregate is exactly the weighted sum of B_i A_i."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from typing_extensions import override

from lightning_parablock.aggregation.aggregator import AggregateResult, Aggregator
from lightning_parablock.aggregation.nonfinite import kept_clients, non_finite_clients
from lightning_parablock.aggregation.rules import Deltas, check_deltas
from lightning_parablock.core.lora import LORA_A_WEIGHT, LORA_B_WEIGHT


def _rank_dim(name: str) -> int:
    """The LoRA rank's dimension, sized by each client's rank: A is (r_i, in), B (out, r_i)."""
    return 0 if name.endswith(LORA_A_WEIGHT) else 1


class StackingAggregator(Aggregator):
    """The server of FLoRA: per adapted layer, ``[w_i ΔB_i]`` side by side and ``[ΔA_i]`` one under another.

    The aggregate keeps the adapters' names with stacked shapes: ``lora_B`` is
    ``(out, Σ r_i)`` and ``lora_A`` is ``(Σ r_i, in)``, clients in ascending id; clients may send
    different ranks r_i. Non-finite deltas raise, or with ``nonfinite="skip"`` their clients are
    left out of the stack.
    """

    def __init__(self, nonfinite: str = "raise") -> None:
        super().__init__(nonfinite=nonfinite)

    @override
    def __call__(self, deltas: Deltas, weights: Mapping[int, float]) -> AggregateResult:
        names = check_deltas(deltas, free_dim=_rank_dim)
        not_lora = [n for n in names if not n.endswith((LORA_A_WEIGHT, LORA_B_WEIGHT))]
        if not_lora:
            raise ValueError(f"FLoRA stacks LoRA adapters only; the block also holds {not_lora[:3]}.")
        bad = non_finite_clients(deltas)
        kept = kept_clients(list(deltas), bad, self.nonfinite)
        total = sum(weights[client] for client in kept)
        aggregate: dict[str, Tensor] = {}
        for name in names:
            if name.endswith(LORA_B_WEIGHT):
                aggregate[name] = torch.cat([deltas[c][name].float() * (weights[c] / total) for c in kept], dim=1)
            else:
                aggregate[name] = torch.cat([deltas[c][name].float() for c in kept], dim=0)
        return AggregateResult(aggregate, sorted(bad))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(nonfinite={self.nonfinite!r})"
