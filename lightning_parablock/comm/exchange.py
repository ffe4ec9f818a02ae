"""One round's exchange: what it produced and cost, and the in-memory transport that runs it in this process."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Protocol, Union

import torch
from torch import Tensor
from torch.profiler import record_function

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.comm.codecs import EncodedTensor, as_encoded, decode_delta, encoded_nbytes
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.core.device_copies import COPY_RANGE
from lightning_parablock.core.sizes import nbytes_of


class CommunicationError(RuntimeError):
    """The exchange of a round failed or timed out on the communication thread."""


@dataclass
class RoundExchange:
    """What one exchange produced and what it cost."""

    round: int
    block: int
    aggregate: Optional[dict[str, Tensor]]  # Δ_t in fp32, on the host; None when no sender was kept
    skipped_clients: list[int]  # left out for a non-finite delta
    upload_bytes: dict[int, int]  # per client
    download_bytes: int  # the aggregate, received by each client
    link_seconds: float  # modelled: clients in parallel, upload then download
    work_seconds: float  # measured: copies and aggregation on the thread


class Transport(Protocol):
    """How one round's deltas meet: returns the aggregate after the (modelled or real) transfer.

    Runs on the communication thread. ``deltas`` are the senders this process hosts, as fp32 tensors or as
    encoded by a :class:`~lightning_parablock.comm.codecs.Codec` (decoded to fp32 before aggregating; the
    bytes counted are the encoded ones); ``weights`` their
    unnormalized aggregation weights (1 for uniform, the sample count for ``"samples"``), normalized over
    every sender the aggregate keeps. :func:`exchange` keeps every client in this process;
    :class:`~lightning_parablock.comm.distributed.CollectiveTransport` adds the other ranks' with torch.distributed.
    """

    def __call__(
        self,
        round_index: int,
        block: int,
        deltas: Mapping[int, Mapping[str, Union[Tensor, EncodedTensor]]],
        weights: Mapping[int, float],
        link: SimulatedLink,
        aggregator: Aggregator,
        stop: threading.Event,
    ) -> RoundExchange: ...


def exchange(
    round_index: int,
    block: int,
    deltas: Mapping[int, Mapping[str, Union[Tensor, EncodedTensor]]],
    weights: Mapping[int, float],
    link: SimulatedLink,
    aggregator: Optional[Aggregator] = None,
    stop: Optional[threading.Event] = None,
) -> RoundExchange:
    """The in-memory transport: upload every delta, aggregate, download; return after the modelled link time."""
    start = time.perf_counter()
    with torch.no_grad():  # grad mode is per thread: the worker starts with it on
        with record_function(COPY_RANGE):
            uploaded = {
                client: {name: t.to("cpu") for name, t in as_encoded(delta).items()} for client, delta in deltas.items()
            }
        upload_bytes = {client: encoded_nbytes(delta) for client, delta in uploaded.items()}
        result = (aggregator or Aggregator())({c: decode_delta(d) for c, d in uploaded.items()}, weights)
    download_bytes = nbytes_of(result.aggregate)
    return finish_exchange(
        round_index, block, result.aggregate, result.skipped_clients, upload_bytes, download_bytes, link, start, stop
    )


def finish_exchange(
    round_index: int,
    block: int,
    aggregate: Optional[dict[str, Tensor]],
    skipped_clients: list[int],
    upload_bytes: dict[int, int],
    download_bytes: int,
    link: SimulatedLink,
    started_at: float,
    stop: Optional[threading.Event],
) -> RoundExchange:
    """Wait out what is left of the modelled link time after the real work, and describe the exchange."""
    link_seconds = 0.0
    if upload_bytes:
        link_seconds = max(link.transfer_seconds(n) for n in upload_bytes.values()) + link.transfer_seconds(
            download_bytes
        )
    work_seconds = time.perf_counter() - started_at
    if link_seconds > work_seconds:  # an Event, not sleep(): shutdown must not wait for a modelled link
        (stop or threading.Event()).wait(link_seconds - work_seconds)
    return RoundExchange(
        round=round_index,
        block=block,
        aggregate=aggregate,
        skipped_clients=skipped_clients,
        upload_bytes=upload_bytes,
        download_bytes=download_bytes,
        link_seconds=link_seconds,
        work_seconds=work_seconds,
    )
