"""FLoRA: stacking-based aggregation of LoRA adapters (Wang et al., 2024).

Averaging B and A separately is not averaging the updates B·A: mean(B)·mean(A) ≠ mean(B·A).
FLoRA's server stacks instead: [w_1 B_1, ..., w_N B_N] · [A_1; ...; A_N] = Σ_i w_i B_i A_i,
exactly. Every client downloads both stacks (N times the adapters it uploaded, counted in
the timeline), merges the product into its frozen base weights and restarts from fresh
adapters. In this library the deltas a client uploads are ΔA_i and ΔB_i against the
adapters of the round's start, which every client shares (seeded), so A_i = A + ΔA_i and,
B starting at zero, B_i = ΔB_i.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, TYPE_CHECKING

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_parablock.aggregate import (
    AggregateResult,
    Aggregator,
    Deltas,
    NonFiniteDeltaError,
    check_deltas,
    non_finite_clients,
)
from lightning_parablock.lora import ADAPTER, lora_pairs, merge_products, restart_adapters
from lightning_parablock.strategy import FederatedBlockStrategy

if TYPE_CHECKING:
    import lightning.pytorch as pl

_A, _B = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


class StackingAggregator(Aggregator):
    """The server of FLoRA: per adapted layer, ``[w_i ΔB_i]`` side by side and ``[ΔA_i]`` one under another.

    The aggregate keeps the adapters' names with stacked shapes: ``lora_B`` is
    ``(out, N·r)`` and ``lora_A`` is ``(N·r, in)``, clients in ascending id. Non-finite
    deltas raise, or with ``nonfinite="skip"`` their clients are left out of the stack.
    """

    def __init__(self, nonfinite: str = "raise") -> None:
        super().__init__(nonfinite=nonfinite)

    @override
    def __call__(self, deltas: Deltas, weights: Mapping[int, float]) -> AggregateResult:
        names = check_deltas(deltas)
        not_lora = [n for n in names if not n.endswith((_A, _B))]
        if not_lora:
            raise ValueError(f"FLoRA stacks LoRA adapters only; the block also holds {not_lora[:3]}.")
        bad = non_finite_clients(deltas)
        if bad and self.nonfinite == "raise":
            client, name = next(iter(bad.items()))
            raise NonFiniteDeltaError(f"Client {client} sent a non-finite delta for {name!r}.")
        kept = [client for client in sorted(deltas) if client not in bad]
        if not kept:
            raise NonFiniteDeltaError(f"Every client of the round sent a non-finite delta: {sorted(bad)}.")
        total = sum(weights[client] for client in kept)
        aggregate: dict[str, Tensor] = {}
        for name in names:
            if name.endswith(_B):
                aggregate[name] = torch.cat([deltas[c][name].float() * (weights[c] / total) for c in kept], dim=1)
            else:
                aggregate[name] = torch.cat([deltas[c][name].float() for c in kept], dim=0)
        return AggregateResult(aggregate, sorted(bad))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(nonfinite={self.nonfinite!r})"


def stacked_products(
    stacked: Mapping[str, Tensor], adapters: Mapping[str, Tensor], pairs: Sequence[tuple[str, str, str]]
) -> dict[str, Tensor]:
    """Σ_i w_i B_i A_i per base weight, from the stacks and the round's starting A (``adapters``).

    ``pairs`` are (base, A, B) names; A_i = A + ΔA_i, so the A stack is the starting A
    repeated once per client plus the stacked ΔA_i.
    """
    products = {}
    for base, a, b in pairs:
        if a not in stacked:
            continue
        a_start = adapters[a].float().to(stacked[a].device)
        clients = stacked[a].shape[0] // a_start.shape[0]
        products[base] = stacked[b] @ (a_start.repeat(clients, 1) + stacked[a])
    return products


class FLoRAStrategy(FederatedBlockStrategy):
    """:class:`FederatedBlockStrategy` whose round boundary merges FLoRA's stacked product and restarts LoRA.

    Use with ``CausalLMModule(lora=...)``, ``block_patterns=["lora_"]`` and
    ``ParaBlockCallback(staleness=0, aggregator=StackingAggregator())``: FLoRA is synchronous.
    """

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        from lightning_parablock.callback import ParaBlockCallback

        for callback in trainer.callbacks:
            if isinstance(callback, ParaBlockCallback):
                if callback.staleness != 0 or not isinstance(callback.aggregator, StackingAggregator):
                    raise MisconfigurationException(
                        "FLoRAStrategy merges every round's adapters before the next round starts: use"
                        " `ParaBlockCallback(staleness=0, aggregator=StackingAggregator())`, got"
                        f" staleness={callback.staleness} and aggregator={callback.aggregator!r}."
                    )
        if not any(True for _ in lora_pairs(self.lightning_module)):
            raise MisconfigurationException("FLoRAStrategy needs LoRA adapters: `CausalLMModule(lora={...})`.")

    @override
    @torch.no_grad()
    def apply_aggregate(
        self, round_index: int, aggregate: Optional[dict[str, Tensor]], left_out: Sequence[int] = ()
    ) -> None:
        """Merge Σ_i w_i B_i A_i into the base weights, restart the adapters, drop the round's deltas."""
        assert self.active_client is None, "cannot aggregate while a client's view is loaded"
        model = self.lightning_module
        params = dict(model.named_parameters())
        pairs = [(p.base, p.a, p.b) for p in lora_pairs(model)]
        if aggregate is not None:
            for _, _, b in pairs:
                if b in aggregate and params[b].count_nonzero():
                    raise RuntimeError(f"FLoRA expects every round to start with B = 0, but {b!r} is not zero.")
            products = stacked_products(aggregate, {a: params[a] for _, a, _ in pairs}, pairs)
            merge_products(model, {base: self.global_lr * product for base, product in products.items()})
        restart_adapters(model, self.seed, 0xF10A, round_index)
        self.federation.apply_aggregate(round_index, None, left_out)  # the merge above was the global update
