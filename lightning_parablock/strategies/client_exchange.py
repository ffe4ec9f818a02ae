"""This process's side of the exchange: its hosted clients' uploads go out, the aggregate comes back and is applied.

:class:`ClientExchange` owns everything of the exchange that lives in this process: the run's
:class:`~.exchange_spec.ExchangeSpec`, the encoder and each client's error-feedback residual, the communication
thread with the run's transport, and the round boundary that applies an aggregate. ``ParaBlockCallback`` only
says when (``strategy.start_exchange`` / ``strategy.finish_exchange``). FLoRA subclasses it to send rank-r_i
adapters and to merge the stacked product instead of adding a delta.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_parablock.comm.codecs import EncodedDelta, encode_delta
from lightning_parablock.comm.distributed import gather_from_ranks
from lightning_parablock.comm.transport import ExchangeContext, ExchangeResult, RoundUploads
from lightning_parablock.comm.worker import CommWorker
from lightning_parablock.core.federation import Federation
from lightning_parablock.core.planning import RoundPlan
from lightning_parablock.core.sizes import nbytes_of
from lightning_parablock.strategies.exchange_spec import ExchangeSpec
from lightning_parablock.telemetry.timeline import RoundRecord, merge_rank_records


@dataclass(frozen=True)
class ExchangeOutcome:
    """A finished exchange, as the round boundary saw it."""

    result: ExchangeResult  # its aggregate applied and gone (``None``): that memory holds a later round's sum
    exposed_wait_seconds: float  # measured: the main thread blocked on it


class ClientExchange:
    """Uploads, residuals and the round boundary of the clients this process hosts, over the run's transport.

    Args:
        federation: the hosted clients' pending deltas over the global model (and its blocks).
        plan: who trains which block in which round (on every process alike).
        spec: the run's exchange.
        global_lr: η, the step along an aggregate.
        device: the training device.
    """

    def __init__(
        self, federation: Federation, plan: RoundPlan, spec: ExchangeSpec, global_lr: float, device: torch.device
    ) -> None:
        self.federation = federation
        self.plan = plan
        self.spec = spec
        self.global_lr = global_lr
        self.device = device
        self.residuals: dict[int, dict[str, Tensor]] = {}  # per client: what error feedback has not sent yet
        self._worker: Optional[CommWorker] = None

    # ------------------------------------------------------------------ uploads

    def uploads(self, round_index: int) -> RoundUploads:
        """Each hosted client's delta of ``round_index`` encoded for the wire (residuals updated), and its weight."""
        deltas = self.federation.round_deltas(round_index)
        encoded: dict[int, EncodedDelta] = {
            client: encode_delta(self.spec.codec, self.upload_of(client, delta), self.residuals.setdefault(client, {}))
            for client, delta in deltas.items()
        }
        weights = self.spec.aggregator.client_weights(self.federation.sample_counts(list(deltas)))
        return RoundUploads(round_index, self.plan.block_of(round_index), encoded, weights)

    def upload_of(self, client: int, delta: dict[str, Tensor]) -> dict[str, Tensor]:
        """What of a client's delta goes up the link: all of it here (FLoRA sends a rank-r_i slice)."""
        return delta

    # ----------------------------------------------------------------- the thread

    def start(self, round_index: int) -> None:
        """Hand the uploads of ``round_index`` to the communication thread."""
        self._thread().submit(self.uploads(round_index))

    def finish(self, round_index: int) -> Optional[ExchangeOutcome]:
        """Wait for the exchange of ``round_index`` if one is in flight and apply its aggregate (the boundary)."""
        if self._worker is None or not self._worker.in_flight(round_index):
            return None
        waited_from = time.perf_counter()
        result = self._worker.wait(round_index)
        waited = time.perf_counter() - waited_from
        self.apply_aggregate(result.round, result.aggregate, left_out=result.skipped_clients)
        result.release_aggregate()  # applied: its memory may hold the next round's sum
        for client in result.skipped_clients:
            self.residuals.pop(client, None)  # it restarts from the global model: nothing of its past is owed
        return ExchangeOutcome(replace(result, aggregate=None), waited)

    def _thread(self) -> CommWorker:
        assert self._worker is not None, "the client exchange is not open: call `open(...)` at setup"
        return self._worker

    def open(self, member: int, members: int) -> None:
        """Build the transport and the communication thread; every process of the run calls it at setup."""
        federation = self.federation
        context = ExchangeContext(
            aggregator=self.spec.aggregator,
            link=self.spec.link,
            timeout_s=self.spec.comm_timeout,
            placement=list(self.plan.placement),
            member=member,
            members=members,
            block_layout=lambda block: [
                (name, p.shape) for name, p in federation.partition.parameters(federation.model, block).items()
            ],
            device=self.device,
        )
        self._worker = CommWorker(self.spec.transport.build(context), self.spec.comm_timeout, device=self.device)

    def close(self) -> None:
        """Stop the communication thread without waiting for exchanges nobody will collect, and let its transport
        go with the memory it keeps for sums (a block of fp32: `open` builds a new one)."""
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None

    # ----------------------------------------------------------------- boundary

    def apply_aggregate(
        self, round_index: int, aggregate: Optional[dict[str, Tensor]], left_out: Sequence[int] = ()
    ) -> None:
        """The boundary for round ``round_index``: global += η Δ, and every client drops its own Δ^i.

        ``aggregate``'s memory makes a later round's sum once this returns: an override that keeps it copies it."""
        self.federation.apply_aggregate(round_index, aggregate, left_out)

    def merge_round_record(self, record: RoundRecord) -> RoundRecord:
        """One record of the round for every process: each measured only its own clients (a collective)."""
        record.rank = self.plan.rank
        if self.plan.world_size == 1 or not torch.distributed.is_initialized():
            return record
        return merge_rank_records(gather_from_ranks(record, self.plan.world_size))

    def residual_nbytes(self) -> int:
        """Bytes of the hosted clients' error-feedback residuals (up to an fp32 copy of every block they trained)."""
        return sum(nbytes_of(residual) for residual in self.residuals.values())

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The hosted clients' residuals, saved beside the federation's state (schema version 3)."""
        return {"residuals": {client: dict(r) for client, r in self.residuals.items() if r}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the hosted clients' residuals (from this or every process's checkpoint)."""
        home = torch.device("cpu") if self.federation.offload_deltas else next(self.federation.model.parameters()).device
        self.residuals = {
            int(client): {name: t.to(home) for name, t in residual.items()}
            for client, residual in state.get("residuals", {}).items()
            if int(client) in self.federation.clients
        }
