"""The in-memory transport: every client lives in this process, so their deltas meet in its memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import torch
from torch.profiler import record_function

from lightning_parablock.aggregation.aggregator import Aggregator, AggregateResult
from lightning_parablock.comm.codecs import EncodedDelta, as_encoded, decode_delta, encoded_nbytes, summands_of
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.comm.sum_buffers import SumBuffers
from lightning_parablock.comm.transport import (
    ExchangeResult,
    RoundUploads,
    result_after_modelled_link,
    views_by_layout,
)
from lightning_parablock.core.device_copies import COPY_RANGE


class InMemoryTransport:
    """Decodes every upload, aggregates, and returns after the modelled link time (real work counted in it).

    A rule that sums makes the sum in memory used again round after round
    (:class:`~lightning_parablock.comm.sum_buffers.SumBuffers`), and the mean reads fp32 and bf16 uploads as they
    are: each delta is read once and no new memory is touched once the first round is done.

    Args:
        aggregator: the server's rule.
        link: the modelled link whose time the exchange takes at least.
    """

    def __init__(self, aggregator: Aggregator, link: SimulatedLink) -> None:
        self.aggregator = aggregator
        self.link = link
        self.sums = SumBuffers()

    def exchange(self, uploads: RoundUploads, stop: threading.Event) -> ExchangeResult:
        start = time.perf_counter()
        with torch.no_grad():  # grad mode is per thread: the worker starts with it on
            with record_function(COPY_RANGE):
                received = {
                    client: {name: t.to("cpu") for name, t in as_encoded(delta).items()}
                    for client, delta in uploads.deltas.items()
                }
            upload_bytes = {client: encoded_nbytes(delta) for client, delta in received.items()}
            if not received:  # no sender this round (all sat out, or left out before): nothing to apply
                return result_after_modelled_link(uploads, None, [], upload_bytes, self.link, start, stop)
            result, release = self._aggregate(received, uploads.weights)
        aggregate, skipped = result.aggregate, result.skipped_clients
        return result_after_modelled_link(uploads, aggregate, skipped, upload_bytes, self.link, start, stop, release)

    def _aggregate(
        self, received: dict[int, EncodedDelta], weights: Mapping[int, float]
    ) -> tuple[AggregateResult, Callable[[], None]]:
        """The rule over every upload; a sum is made in reused memory, and the release of that memory comes along."""
        rule = self.aggregator
        if not rule.sums_in_given_memory:
            return rule({c: decode_delta(d) for c, d in received.items()}, weights), lambda: None
        read = summands_of if rule.reads_payloads_as_sent else decode_delta
        summands = {client: read(delta) for client, delta in received.items()}
        first = summands[min(summands)]
        flat, release = self.sums.take(
            sum(t.numel() for t in first.values()), pin_memory=any(t.is_pinned() for t in first.values())
        )
        layout = [(name, tensor.shape) for name, tensor in first.items()]  # every client's, or the rule refuses
        return rule(summands, weights, into=views_by_layout(flat, layout)), release

    def describe_stall(self, round_index: int) -> str:
        return "Every client is in this process: the aggregator itself did not return."

