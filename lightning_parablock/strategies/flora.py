"""FLoRA: stacking-based aggregation of LoRA adapters (Wang et al., 2024).

Averaging B and A separately is not averaging the updates B·A: mean(B)·mean(A) ≠ mean(B·A).
FLoRA's server stacks instead: [w_1 B_1, ..., w_N B_N] · [A_1; ...; A_N] = Σ_i w_i B_i A_i,
exactly. Every client downloads both stacks (N times the adapters it uploaded, counted in
the timeline), merges the product into its frozen base weights and restarts from fresh
adapters. In this library the deltas a client uploads are ΔA_i and ΔB_i against the
adapters of the round's start, which every client shares (seeded), so A_i = A + ΔA_i and,
B starting at zero, B_i = ΔB_i.

Clients may have different ranks (``FLoRAStrategy(client_ranks=[...])``, FLoRA's point): the
module holds adapters of rank r_max = the module's ``r``, and client i trains only their first r_i
components (rows of A, columns of B; the gradients of the others are zeroed while its view is
loaded, and what its optimizer does to them anyway, e.g. weight decay, is left out of its delta).
It uploads B_i (out × r_i) and A_i (r_i × in) only, so the bytes counted are those of a rank-r_i
adapter, and the stack is Σ r_i wide. Every client's product is scaled as the module's, alpha / r_max:
a rank-r_i client is the rank-r_max adapter with its other components at zero, and the stacked
product is merged with one scale (peft's per-rank alpha / r_i would make the same B_i A_i count
differently per client; choose ``lora_alpha`` for r_max).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_parablock.aggregation.stacking import StackingAggregator
from lightning_parablock.argument_checks import check_int
from lightning_parablock.core.federation import Federation
from lightning_parablock.core.lora import (
    ADAPTER,
    LORA_A_WEIGHT,
    LoraPair,
    lora_pairs,
    merge_products,
    restart_adapters,
)
from lightning_parablock.core.planning import RoundPlan
from lightning_parablock.core.rng import Stream, stream_generator
from lightning_parablock.strategies.client_exchange import ClientExchange
from lightning_parablock.strategies.exchange_spec import ExchangeSpec
from lightning_parablock.strategies.federated_block import FederatedBlockStrategy
from lightning_parablock.strategies.run_settings import RunSettings

if TYPE_CHECKING:
    import lightning.pytorch as pl


def stacked_products(
    stacked: Mapping[str, Tensor],
    adapters: Mapping[str, Tensor],
    pairs: Sequence[tuple[str, str, str]],
    ranks: Optional[Sequence[int]] = None,
) -> dict[str, Tensor]:
    """Σ_i w_i B_i A_i per base weight, from the stacks and the round's starting A (``adapters``).

    ``pairs`` are (base, A, B) names; A_i = A[:r_i] + ΔA_i, so the A stack is each client's first
    r_i rows of the starting A plus the stacked ΔA_i. ``ranks`` are the stacked clients' r_i in
    order; by default every client has the adapters' full rank.
    """
    products = {}
    for base, a, b in pairs:
        if a not in stacked:
            continue
        a_start = adapters[a].float().to(stacked[a].device)
        own = ranks if ranks is not None else [a_start.shape[0]] * (stacked[a].shape[0] // a_start.shape[0])
        products[base] = stacked[b] @ (torch.cat([a_start[:r] for r in own]) + stacked[a])
    return products


class StackedLoRAExchange(ClientExchange):
    """FLoRA's side of the exchange: rank-r_i adapters go up, the stacked product is merged into the base weights.

    Args:
        *args: :class:`~lightning_parablock.strategies.client_exchange.ClientExchange`'s arguments.
        seed: seeds the fresh adapters every round starts from (the same on every client).
        client_ranks: each client's LoRA rank r_i, or ``None`` when every client has the module's.
    """

    def __init__(self, *args: Any, seed: int, client_ranks: Optional[list[int]] = None) -> None:
        super().__init__(*args)
        self.seed = seed
        self.client_ranks = client_ranks

    @override
    def upload_of(self, client: int, delta: dict[str, Tensor]) -> dict[str, Tensor]:
        """ΔA_i (r_i × in) and ΔB_i (out × r_i): a rank-r_i client sends a rank-r_i adapter."""
        if self.client_ranks is None:
            return delta
        rank = self.client_ranks[client]
        return {n: t[:rank] if n.endswith(LORA_A_WEIGHT) else t[:, :rank] for n, t in delta.items()}

    @override
    @torch.no_grad()
    def apply_aggregate(
        self, round_index: int, aggregate: Optional[dict[str, Tensor]], left_out: Sequence[int] = ()
    ) -> None:
        """Merge Σ_i w_i B_i A_i into the base weights, restart the adapters, drop the round's deltas."""
        assert self.federation.active_client is None, "cannot aggregate while a client's view is loaded"
        model = self.federation.model
        params = dict(model.named_parameters())
        pairs = [(p.base, p.a, p.b) for p in lora_pairs(model)]
        if aggregate is not None:
            for _, _, b in pairs:
                if b in aggregate and params[b].count_nonzero():
                    raise RuntimeError(f"FLoRA expects every round to start with B = 0, but {b!r} is not zero.")
            senders = sorted(set(self.plan.participants_of(round_index)) - set(left_out))
            ranks = None if self.client_ranks is None else [self.client_ranks[c] for c in senders]
            products = stacked_products(aggregate, {a: params[a] for _, a, _ in pairs}, pairs, ranks)
            merge_products(model, {base: self.global_lr * product for base, product in products.items()})
        restart_adapters(model, stream_generator(self.seed, Stream.LORA_RESTART, round_index))
        self.federation.apply_aggregate(round_index, None, left_out)  # the merge above was the global update


class FLoRAStrategy(FederatedBlockStrategy):
    """:class:`FederatedBlockStrategy` whose round boundary merges FLoRA's stacked product and restarts LoRA.

    Use with ``CausalLMModule(lora=...)``, ``block_patterns=["lora_"]`` and
    ``ParaBlockCallback(staleness=0, aggregator=StackingAggregator())``: FLoRA is synchronous.

    Args:
        client_ranks: each client's LoRA rank r_i, from 1 to the module's ``r`` (one entry per client);
            by default every client has the module's rank. One process only, for now.
        **kwargs: :class:`FederatedBlockStrategy`'s arguments.
    """

    def __init__(self, *args: Any, client_ranks: Optional[list[int]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        num_clients = self.options.num_clients
        if client_ranks is not None:
            if not isinstance(client_ranks, (list, tuple)):
                raise TypeError(f"`client_ranks` must be a list with one LoRA rank per client, got {client_ranks!r}.")
            if len(client_ranks) != num_clients:
                raise ValueError(
                    f"`client_ranks` needs one rank per client (num_clients={num_clients}),"
                    f" got {len(client_ranks)}: {client_ranks}."
                )
            for i, rank in enumerate(client_ranks):
                check_int(f"client_ranks[{i}]", rank, minimum=1)
        self.client_ranks = None if client_ranks is None else list(client_ranks)
        self._gradient_hooks: list[Any] = []

    @override
    def check_exchange(self, spec: ExchangeSpec) -> None:
        if spec.staleness != 0 or not isinstance(spec.aggregator, StackingAggregator):
            raise MisconfigurationException(
                "FLoRAStrategy merges every round's adapters before the next round starts: use"
                " `ParaBlockCallback(staleness=0, aggregator=StackingAggregator())`, got"
                f" staleness={spec.staleness} and aggregator={spec.aggregator!r}."
            )

    @override
    def make_client_exchange(self, federation: Federation, plan: RoundPlan, spec: ExchangeSpec) -> ClientExchange:
        return StackedLoRAExchange(
            federation,
            plan,
            spec,
            self.options.global_lr,
            self.root_device,
            seed=self.options.seed,
            client_ranks=self.client_ranks,
        )

    @override
    def run_settings(self) -> RunSettings:
        return {**super().run_settings(), "client_ranks": self.client_ranks}

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        pairs = list(lora_pairs(self.lightning_module))
        if not pairs:
            raise MisconfigurationException("FLoRAStrategy needs LoRA adapters: `CausalLMModule(lora={...})`.")
        if self.client_ranks is not None:
            self._check_ranks(pairs, trainer.world_size)
            for pair in pairs:
                a, b = pair.layer.lora_A[ADAPTER].weight, pair.layer.lora_B[ADAPTER].weight
                self._gradient_hooks.append(a.register_hook(lambda grad: self._own_components(grad, rows=True)))
                self._gradient_hooks.append(b.register_hook(lambda grad: self._own_components(grad, rows=False)))

    @override
    def teardown(self) -> None:
        """Remove the gradient hooks: the module leaves the fit as it came."""
        for handle in self._gradient_hooks:
            handle.remove()
        self._gradient_hooks = []
        super().teardown()

    def _check_ranks(self, pairs: Sequence[LoraPair], world_size: int) -> None:
        r_max = min(pair.layer.lora_A[ADAPTER].weight.shape[0] for pair in pairs)
        too_large = [(i, r) for i, r in enumerate(self.client_ranks) if r > r_max]
        if too_large:
            i, rank = too_large[0]
            raise MisconfigurationException(
                f"`client_ranks[{i}]={rank}` is above the module's LoRA rank r={r_max}: every rank must be from 1 to"
                f" {r_max} (give the module r = max(client_ranks) = {max(self.client_ranks)})."
            )
        if world_size > 1:
            raise MisconfigurationException(
                f"`client_ranks` (heterogeneous LoRA ranks) runs on one process for now, got world_size={world_size}:"
                " the collective exchange gathers equal-sized deltas."
            )

    def rank_of(self, client: int) -> Optional[int]:
        """Client ``client``'s LoRA rank r_i, or ``None`` when every client has the module's."""
        return None if self.client_ranks is None else self.client_ranks[client]

    def _own_components(self, tensor: Tensor, rows: bool, client: Optional[int] = None) -> Tensor:
        """``tensor`` (a gradient or delta of A, by rows, or of B, by columns) with the components beyond the
        client's rank set to zero; the active client's by default, unchanged between turns."""
        client = self.federation.active_client if client is None else client
        rank = None if client is None else self.rank_of(client)
        if rank is None or rank >= tensor.shape[0 if rows else 1]:
            return tensor
        kept = tensor.clone()
        (kept[rank:] if rows else kept[:, rank:]).zero_()
        return kept

    @override
    def on_client_turn_end(self, client: int, round_index: int) -> None:
        """A client below the module's rank keeps no change beyond its own components (weight decay moves them)."""
        if self.rank_of(client) is None:
            return
        for name, tensor in (self.federation.delta_of(client, round_index) or {}).items():
            tensor.copy_(self._own_components(tensor, rows=name.endswith(LORA_A_WEIGHT), client=client))
