"""This process's side of a round's exchange: its hosted clients' uploads go out, the aggregate comes back.

``ParaBlockCallback`` runs the exchange (when, on which thread, what is logged); :class:`ClientExchange` answers
what it needs from the federation: each hosted client's delta encoded for the wire and its aggregation weight,
the transport (in memory with one process, collectives with several), the round boundary that applies the
aggregate, and one round record for every rank. FLoRA subclasses it to send rank-r_i adapters and to merge
the stacked product instead of adding a delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.comm.codecs import Codec, EncodedDelta, encode_delta
from lightning_parablock.comm.distributed import collective_worker, gather_from_ranks
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.comm.worker import CommWorker
from lightning_parablock.core.federation import Federation
from lightning_parablock.core.planning import RoundPlan
from lightning_parablock.strategies.federation_options import FederationOptions
from lightning_parablock.telemetry.timeline import RoundRecord, merge_rank_records


class ClientExchange:
    """Uploads, weights and the round boundary of the clients this process hosts.

    Args:
        federation: the hosted clients' pending deltas over the global model (and its blocks).
        plan: who trains which block in which round (on every rank alike).
        options: the strategy's federation settings (weighting, η).
        device: the training device.
    """

    def __init__(
        self,
        federation: Federation,
        plan: RoundPlan,
        options: FederationOptions,
        device: torch.device,
    ) -> None:
        self.federation = federation
        self.plan = plan
        self.options = options
        self.device = device

    def uploads(self, round_index: int, codec: Codec) -> dict[int, EncodedDelta]:
        """Each hosted client's delta of ``round_index`` encoded for the wire (error-feedback residuals updated)."""
        return {
            client: encode_delta(codec, self.upload_of(client, delta), self.federation.clients[client].residual)
            for client, delta in self.federation.round_deltas(round_index).items()
        }

    def upload_of(self, client: int, delta: dict[str, Tensor]) -> dict[str, Tensor]:
        """What of a client's delta goes up the link: all of it here (FLoRA sends a rank-r_i slice)."""
        return delta

    def weights(self, round_index: int) -> dict[int, float]:
        """Unnormalized aggregation weights of the hosted senders of ``round_index`` (1, or the sample count)."""
        senders = self.federation.round_deltas(round_index)
        if self.options.weighting == "uniform":
            return {client: 1.0 for client in senders}
        return {client: float(n) for client, n in self.federation.sample_counts(list(senders)).items()}

    def apply_aggregate(
        self, round_index: int, aggregate: Optional[dict[str, Tensor]], left_out: Sequence[int] = ()
    ) -> None:
        """The boundary for round ``round_index``: global += η Δ, and every client drops its own Δ^i."""
        self.federation.apply_aggregate(round_index, aggregate, left_out)

    def comm_worker(self, link: SimulatedLink, aggregator: Aggregator, timeout_s: float) -> CommWorker:
        """The communication thread with this run's transport: in memory, or collectives across ranks."""
        if self.plan.world_size == 1:
            return CommWorker(link, timeout_s, aggregator, device=self.device)
        return collective_worker(link, aggregator, timeout_s, self.plan.placement, self._block_layout, self.device)

    def _block_layout(self, block: int) -> list[tuple[str, torch.Size]]:
        federation = self.federation
        return [(name, p.shape) for name, p in federation.partition.parameters(federation.model, block).items()]

    def merge_round_record(self, record: RoundRecord) -> RoundRecord:
        """One record of the round for every rank: each rank measured only its own clients."""
        record.rank = self.plan.rank
        if self.plan.world_size == 1:
            return record
        return merge_rank_records(gather_from_ranks(record, self.plan.world_size))
