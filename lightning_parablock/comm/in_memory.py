"""The in-memory transport: every client lives in this process, so their deltas meet in its memory."""

from __future__ import annotations

import threading
import time

import torch
from torch.profiler import record_function

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.comm.codecs import as_encoded, decode_delta, encoded_nbytes
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.comm.transport import ExchangeResult, RoundUploads, result_after_modelled_link
from lightning_parablock.core.device_copies import COPY_RANGE


class InMemoryTransport:
    """Decodes every upload, aggregates, and returns after the modelled link time (real work counted in it).

    Args:
        aggregator: the server's rule.
        link: the modelled link whose time the exchange takes at least.
    """

    def __init__(self, aggregator: Aggregator, link: SimulatedLink) -> None:
        self.aggregator = aggregator
        self.link = link

    def exchange(self, uploads: RoundUploads, stop: threading.Event) -> ExchangeResult:
        start = time.perf_counter()
        with torch.no_grad():  # grad mode is per thread: the worker starts with it on
            with record_function(COPY_RANGE):
                received = {
                    client: {name: t.to("cpu") for name, t in as_encoded(delta).items()}
                    for client, delta in uploads.deltas.items()
                }
            upload_bytes = {client: encoded_nbytes(delta) for client, delta in received.items()}
            decoded = {client: decode_delta(delta) for client, delta in received.items()}
            if not decoded:  # no sender this round (all sat out, or left out before): nothing to apply
                return result_after_modelled_link(uploads, None, [], upload_bytes, self.link, start, stop)
            result = self.aggregator(decoded, uploads.weights)
        aggregate, skipped = result.aggregate, result.skipped_clients
        return result_after_modelled_link(uploads, aggregate, skipped, upload_bytes, self.link, start, stop)

    def describe_stall(self, round_index: int) -> str:
        return "Every client is in this process: the aggregator itself did not return."
